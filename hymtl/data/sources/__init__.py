"""Data sources: one module per shape of data, each turning its description into samples.

* :mod:`~hymtl.data.sources.folder` — class folders (``data=folder``, ``data=hymenoptera``);
* :mod:`~hymtl.data.sources.table` — a label file, CSV/TSV/JSON lines (``data=table``);
* :mod:`~hymtl.data.sources.parquet` — Parquet files with the images' bytes (``data=parquet``).

A new source is a :class:`DataSource` subclass in a module here and a YAML in ``conf/data/``
naming it (``source: hymtl.data.sources.<Class>``); the datamodule passes it the ``data.*``
keys that are not its own.
"""

from hymtl.data.samples import Sample, content_fingerprint
from hymtl.data.sources.base import DataSource, SourceData
from hymtl.data.sources.folder import FolderSource
from hymtl.data.sources.parquet import ParquetSource
from hymtl.data.sources.table import TableSource

__all__ = ["DataSource", "FolderSource", "ParquetSource", "Sample", "SourceData", "TableSource", "content_fingerprint"]


def saved_source(data_cfg, launched_from=None) -> DataSource | None:
    """The source a run's saved ``data`` config names (``.hydra/config.yaml``: ``source`` and its
    keys), its relative paths taken from the folder the run was launched from; ``None`` when
    the config names no source this version knows (the export's parity images, from any source)."""
    import os

    from hydra.utils import get_class

    name = data_cfg.get("source") if data_cfg is not None else None
    try:
        cls = get_class(str(name)) if name else None
    except Exception:  # noqa: BLE001 - a name that does not import: not a source we know
        return None
    if not (isinstance(cls, type) and issubclass(cls, DataSource)):
        return None
    options = {}
    for key in cls.settings():
        value = data_cfg.get(key)
        if isinstance(value, str) and value and launched_from is not None and key in ("root", "file", "files",
                                                                                     "image_root"):
            value = os.path.join(str(launched_from), os.path.expanduser(value))
        if value is not None and not (isinstance(value, str) and value == "???"):
            options[key] = value
    try:
        return cls(**options, multilabel=bool(data_cfg.get("multilabel", False)))
    except Exception:  # noqa: BLE001 - a saved config this source cannot take: no default
        return None

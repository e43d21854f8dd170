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

__all__ = [
    "DataSource", "FolderSource", "ParquetSource", "Sample", "SourceData", "TableSource", "content_fingerprint",
    "saved_source", "trained_validation_inputs",
]


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


def trained_validation_inputs(ckpt_path) -> list:
    """The validation images of the run that wrote ``ckpt_path`` (``RUN/checkpoints/x.ckpt``):
    the val folder of its ``data.root`` (:func:`hymtl.runs.trained_data_root`; its ``test/``,
    else the root itself, when it has no val folder), or, for a label file or Parquet data, the
    samples its source names for val (else test, else all of them: files, or the bytes Parquet
    holds); empty when that cannot be found. What ``hymtl.export`` checks parity on by default."""
    from hymtl.data.folders import VAL_DIR_NAMES, find_classes
    from hymtl.runs import trained_data_root

    root = trained_data_root(ckpt_path)
    if root is None or not root.is_dir():
        return _saved_source_validation_samples(ckpt_path)
    sub = {d.lower(): root / d for d in find_classes(root)}
    for name in (*VAL_DIR_NAMES, "test"):
        if name in sub:
            return [str(sub[name])]
    return [str(root)]


def _saved_source_validation_samples(ckpt_path) -> list:
    """The val samples (else test, else all) of the data source a run's saved config names."""
    from hymtl.errors import HymtlError
    from hymtl.runs import launch_dir, run_dir_of, saved_config

    run = run_dir_of(ckpt_path)
    config = saved_config(run)
    source = saved_source(config.get("data") if config is not None else None, launch_dir(run))
    if source is None:
        return []
    try:
        splits = source.load().splits
    except HymtlError:
        return []
    return list(splits.get("val") or splits.get("test") or splits.get("train") or [])

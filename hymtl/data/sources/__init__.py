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

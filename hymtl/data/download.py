"""Fetching an image folder: download, safe (zip-slip-free) extraction, per-file manifest, the lock."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from hymtl.data.folders import is_visible
from hymtl.errors import DownloadError, printable
from hymtl.fileio import download_file, sha256_file
from hymtl.progress import Progress

log = logging.getLogger(__name__)

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "manifests"  # hymtl/manifests


def _safe_extract(archive: zipfile.ZipFile, dest: Path) -> None:
    """Extract refusing absolute paths, ``..`` components and symlinks (zip-slip); every member
    is checked before any is written. Progress per member, one summary line at the end."""
    dest = dest.resolve()
    members = archive.infolist()
    for info in members:
        name = info.filename
        is_symlink = (info.external_attr >> 16) & 0o170000 == 0o120000
        target = (dest / name).resolve()
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or is_symlink or not target.is_relative_to(dest):
            raise DownloadError(f"refusing unsafe archive member {printable(name)!r}")
    with Progress("extract", total=len(members), unit="files", log=log) as progress:
        for info in members:
            archive.extract(info, dest)
            progress.update(1)


def verify_manifest(folder: Path, manifest: Path) -> None:
    """Check every ``sha256  relative/path`` line of ``manifest`` against ``folder``."""
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(maxsplit=1)
        path = folder / rel.lstrip("*")
        if not path.is_file():
            raise DownloadError(f"downloaded data lacks {printable(rel)}")
        if sha256_file(path) != digest:
            raise DownloadError(f"checksum mismatch for {printable(rel)} in the downloaded data")


def download_and_extract(url: str, root: Path, sha256: str | None = None, manifest: Path | None = None) -> Path:
    """Fetch a zip of an image folder and move it into place at ``root`` atomically.

    ``sha256`` checks the zip itself; ``manifest`` (``sha256sum`` format) checks every
    extracted file. A failure at any step leaves nothing at ``root``.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.", dir=root.parent) as tmp:
        tmp = Path(tmp)
        log.info("downloading %s", printable(url))
        with Progress("download", unit="B", log=log) as progress:  # the size is known only once it answers
            archive_path = download_file(url, tmp / "archive.zip", sha256=sha256,
                                         progress=lambda done, total: progress.update(done - progress.done))
        try:
            with zipfile.ZipFile(archive_path) as archive:
                _safe_extract(archive, tmp / "extracted")
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{printable(url)} is not a valid zip: {printable(exc)}") from None
        except UnicodeDecodeError:  # zipfile decodes flagged names strictly (unflagged ones as cp437)
            raise DownloadError(f"{printable(url)} is not a valid zip: a member name is marked as UTF-8 but is not "
                                f"valid UTF-8; re-create the archive") from None
        entries = [p for p in (tmp / "extracted").iterdir() if is_visible(p.name)]
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp / "extracted"
        if manifest is not None:
            verify_manifest(content, manifest)
        try:
            os.replace(content, root)  # atomic on one file system; fails if root appeared meanwhile
        except OSError:
            if not root.is_dir():
                raise
    return root


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if missing), held for the ``with`` block.

    The holder removes the file before unlocking, leaving no trace; a process that opens a new
    file meanwhile can at worst download concurrently, which stays safe (atomic replace).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:  # POSIX; elsewhere concurrent downloads stay safe, only wasteful
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)

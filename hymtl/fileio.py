"""Atomic file writes and a checksummed, bounded-time HTTP download.

Everything a run writes goes through these helpers so that an interrupted process never
leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from hymtl.errors import DownloadError, WriteError, printable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Raises :class:`~hymtl.errors.WriteError` (one line: which file, and on a full disk how much
    room it needed and had) when the write fails; ``path`` then still holds its old content."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        left = _remove_temporary(tmp)
        raise WriteError(_write_failure(path, len(data), exc) + left) from exc
    except BaseException:
        _remove_temporary(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_temporary(tmp: str | None) -> str:
    """Remove the temporary file of a failed write; where the folder no longer lets it be
    removed (made read-only meanwhile), empty it instead, so no copy of the data stays. Never
    raises: the write's own error is the one to report. Returns what was left, for that report."""
    if tmp is None:
        return ""
    try:
        Path(tmp).unlink(missing_ok=True)
        return ""
    except OSError:
        pass
    try:
        os.truncate(tmp, 0)
    except OSError:
        return f" (its temporary file {printable(tmp)} could not be removed)"
    return f" (its temporary file {printable(tmp)} could not be removed; it was emptied)"


def _write_failure(path: Path, size: int, exc: OSError) -> str:
    """``cannot write PATH: <reason>`` (+ the room needed and free when the disk is full)."""
    message = f"cannot write {path}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        room = f", {free / 1e6:.1f} MB free" if free is not None else ""
        message += f" ({size / 1e6:.1f} MB needed{room} on {path.parent}); the previous file is intact"
    return message


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (power loss); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- the file rule
# Every file hymtl opens for reading (images, checkpoints, exported models, sidecars, saved run
# configs, cache shards) must be a regular file: a FIFO blocks an open() forever, a link to
# /dev/zero or /dev/urandom never ends a read. Checked by stat before anything opens the path,
# and again on the descriptor that is read (the path may be swapped between the two).
NOT_REGULAR = "not a regular file"


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a regular file (``"no such file"``, ``"broken symlink"``,
    ``"symlink loop"``, ``"not a regular file"`` for a folder, FIFO, socket or device,
    ``"cannot stat: …"``), or ``None`` when it can. Follows symlinks; opens nothing."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else "no such file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot stat: {exc.strerror or exc}"
    return None if stat.S_ISREG(info.st_mode) else NOT_REGULAR


def _regular_file_opener(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str | os.PathLike):
    """``open(path, "rb")`` that refuses (``OSError``: ``not a regular file``) a FIFO, device,
    socket or folder — also one swapped in after a :func:`regular_file_problem` check — without
    blocking or reading from it."""
    return open(os.fspath(path), "rb", opener=_regular_file_opener)


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, read once (:func:`open_regular_file`); ``max_bytes``: an
    ``OSError`` (``EFBIG``) for a larger file instead of reading it."""
    with open_regular_file(path) as f:
        if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", os.fspath(path))
        return f.read()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a regular file's bytes (:func:`open_regular_file`: a FIFO is an ``OSError``)."""
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically; verify ``sha256`` (full digest or a prefix).

    A network failure or a checksum mismatch raises :class:`DownloadError` with one line and
    leaves nothing at ``dest``. ``timeout`` bounds every socket operation, so an unreachable
    host fails instead of hanging.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http/https only)
                    total = response.headers.get("Content-Length")
                    total = int(total) if total else None
                    done = 0
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(f"could not download {url}: {reason}") from None
        actual = digest.hexdigest()
        if sha256 and not actual.startswith(sha256.lower()):
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
        os.replace(tmp, dest)
        return dest
    finally:
        Path(tmp).unlink(missing_ok=True)


def shown_path(path: str | Path) -> str:
    """``path`` as the console shows it: relative to the working directory when inside it
    (shorter to read and to paste), else as given; escaped by :func:`~hymtl.errors.printable`."""
    path = Path(path)
    try:
        shown = str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):
        shown = str(path)
    return printable(shown)

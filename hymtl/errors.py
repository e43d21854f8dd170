"""Errors that mean "the user's input is wrong": entry points print them as one line."""


class HymtlError(Exception):
    """Bad input or environment that the user can fix; shown as one line, exit code 2."""


class DataError(HymtlError):
    """The image folder cannot be used (missing, empty, too few classes, bad files in strict mode)."""


class BackboneError(HymtlError):
    """Unknown backbone or pretrained weights that cannot be had."""


class DownloadError(HymtlError):
    """A download failed or its checksum did not match."""


class WriteError(HymtlError, OSError):
    """A result could not be written (full disk, unwritable folder): the file it would have
    replaced is intact. An ``OSError`` too, for callers that tolerate failed writes (the cache)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``str(exc)`` (else the exception's type name), for one-line reports."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text[:limit] if limit else text


def user_error(exc: BaseException | None) -> HymtlError | None:
    """The :class:`HymtlError` behind ``exc``, following ``__cause__``/``__context__`` (Hydra's
    ``instantiate`` wraps the errors of the constructors it calls); ``None`` for a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HymtlError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def printable(text: object) -> str:
    """``text`` safe for one log or terminal line: control characters (newline, tab, ESC, …) and
    bytes that are not valid UTF-8 (``os.fsdecode``'s surrogate escapes) shown as escapes, so a
    file name can neither forge a log line nor reach the terminal raw."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)

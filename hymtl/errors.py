"""Errors that mean "the user's input is wrong": entry points print them as one line."""


class HymtlError(Exception):
    """Bad input or environment that the user can fix; shown as one line, exit code 2."""


class DataError(HymtlError):
    """The image folder cannot be used (missing, empty, too few classes, bad files in strict mode)."""


class BackboneError(HymtlError):
    """Unknown backbone or pretrained weights that cannot be had."""


class DownloadError(HymtlError):
    """A download failed or its checksum did not match."""

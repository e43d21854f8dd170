"""Decoding images (EXIF, transparency, 16-bit, reduced-scale JPEG), transforms, and the bad-file policy.

Images of any common format and letter case are read with their EXIF orientation applied
and converted to RGB. Inside a DataLoader, a file that fails to decode or to transform is
dropped by one rule, :class:`BadImageDropper` (the image and feature datasets both use it).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from hymtl.data.folders import Sample
from hymtl.errors import first_line, printable
from hymtl.fileio import open_regular_file, read_regular_file, regular_file_problem
from hymtl.progress import Progress

if TYPE_CHECKING:
    from hymtl.backbones import Preprocessing

log = logging.getLogger(__name__)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, read once: what is decoded, hashed or cached must all be these
    bytes (a file rewritten between two reads would otherwise pair one content with another's
    digest). What is not a regular file is refused before a byte is read (a FIFO would block, a
    link to ``/dev/zero`` never end): ``OSError`` (:func:`hymtl.fileio.read_regular_file`)."""
    return read_regular_file(path)


def decode_rgb_bytes(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode an image's bytes (:func:`read_image_bytes`, or a sample that carries them) as RGB with
    its EXIF orientation applied (first frame of animations).

    ``min_size``: a JPEG larger than needed is decoded at a reduced scale (libjpeg's DCT
    scaling, PIL ``draft``: 1/2, 1/4 or 1/8) whose both sides stay >= ``min_size``; a
    2592x1944 photo headed for a 256-pixel resize decodes ~8x faster. Other formats ignore it.
    """
    with Image.open(io.BytesIO(data)) as img:
        if min_size and img.format == "JPEG" and min(img.size) >= 2 * min_size:
            img.draft(img.mode, (min_size, min_size))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # composite transparency on white instead of letting convert() drop it to black
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        if img.mode.startswith("I;16") or img.mode == "I":
            img = img.point(lambda v: v / 256).convert("L")
        return img.convert("RGB")


def load_rgb(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Open an image file as RGB: :func:`read_image_bytes` then :func:`decode_rgb_bytes`."""
    return decode_rgb_bytes(read_image_bytes(path), min_size)


class BadImageDropper:
    """The one rule for an image that fails inside a DataLoader: decode ``path`` (:func:`load_rgb`
    at ``decode_size``) and apply ``make`` to the image; a failure at either step gives ``None``
    instead of an exception (the batch drops it: :func:`hymtl.data.loaders.collate_skipping`),
    is logged once per process and appended to ``failure_log`` (``skipped.txt``; appends of one
    short line are atomic, so DataLoader workers can share it).

    Args:
        decode_size: decode JPEGs at a reduced scale whose sides stay >= this (see :func:`load_rgb`).
        failure_log: where to append ``reason<TAB>path`` lines; ``None``: log only.
    """

    def __init__(self, decode_size: int | None = None, failure_log: str | os.PathLike | None = None):
        self.decode_size = decode_size
        self.failure_log = failure_log
        self._reported: set[str] = set()

    def read(self, path: str) -> bytes | None:
        """The file's bytes, read once (:func:`read_image_bytes`), or ``None`` (reported)."""
        try:
            return read_image_bytes(path)
        except Exception as exc:  # noqa: BLE001 - vanished, unreadable, not a regular file: skip it
            self.report(path, f"cannot decode: {first_line(exc)}{RUNTIME_SUFFIX}")
            return None

    def __call__(self, path: str, make: Callable[[Image.Image], Any], data: bytes | None = None) -> Any | None:
        """``make(image)`` of the file ``path``, decoded from ``data`` when given (its bytes, read
        once by the caller), else read here; ``None`` when either step fails."""
        if data is None and (data := self.read(path)) is None:
            return None
        try:
            image = decode_rgb_bytes(data, self.decode_size)
        except Exception as exc:  # noqa: BLE001 - any decoder error: skip the file, keep training
            self.report(path, f"cannot decode: {first_line(exc)}{RUNTIME_SUFFIX}")
            return None
        try:  # geometry can fail on a valid file too (a 10000x2 strip resized to 0 rows)
            return make(image)
        except Exception as exc:  # noqa: BLE001
            self.report(path, f"cannot transform {image.width}x{image.height}: {first_line(exc)}{RUNTIME_SUFFIX}")
            return None

    def report(self, path: str, reason: str) -> None:
        """Log and record ``path`` as skipped: once per process, and once in ``failure_log`` even
        when loaders are rebuilt every epoch (fresh workers, fresh datasets)."""
        if path in self._reported:
            return
        self._reported.add(path)
        log.warning("skipping %s: %s", printable(path), printable(reason))
        if self.failure_log:
            line = skipped_line(BadFile(path, reason))
            try:
                with open(self.failure_log, "a+", encoding="utf-8") as f:
                    f.seek(0)
                    if line not in f.read().splitlines(keepends=True):  # rare, and the file is short
                        f.write(line)
            except OSError as exc:
                log.warning("could not record the skipped file in %s: %s", printable(self.failure_log), exc)


class ImageSampleDataset(Dataset):
    """``(image tensor, label)`` pairs from a list of samples.

    Args:
        transform: applied to the decoded RGB image (``None``: the PIL image itself).
        skip_bad: a file that fails to decode or to transform gives ``None`` instead of an
            exception (:class:`BadImageDropper`: logged, appended to ``failure_log``).
        failure_log: ``skipped.txt`` of the run.
        decode_size: decode JPEGs at a reduced scale whose sides stay >= this (see :func:`load_rgb`).
    """

    def __init__(self, samples: Sequence[Sample], transform=None, skip_bad: bool = False,
                 failure_log: str | os.PathLike | None = None, decode_size: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad
        self.decode_size = decode_size
        self.dropper = BadImageDropper(decode_size, failure_log)

    def __len__(self) -> int:
        return len(self.samples)

    def _prepare(self, image: Image.Image):
        return self.transform(image) if self.transform else image

    def __getitem__(self, index: int):
        sample = self.samples[index]
        if not self.skip_bad:
            return self._prepare(load_rgb(sample.path, self.decode_size)), sample.label
        item = self.dropper(sample.path, self._prepare)
        return None if item is None else (item, sample.label)


# --------------------------------------------------------------------------- bad files
# Real folders hold empty files, truncated downloads, HTML saved as .jpg, broken symlinks and
# decompression bombs. Every file is checked once, cheaply, before training (stat + the image
# header: no pixels decoded); files that still fail to decode during training are dropped from
# their batch (also inside DataLoader workers) and reported. ``strict`` decodes every file up
# front instead and makes any bad file an error.
SKIPPED_FILE_NAME = "skipped.txt"
RUNTIME_SUFFIX = " (during training)"


@dataclass(frozen=True)
class BadFile:
    """A file left out of the run, and why."""

    path: str
    reason: str


def _pixel_limit() -> int | None:
    return Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (None: disabled by the user)


def check_image_file(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Why ``path`` cannot be used as an image, or ``None`` when it can.

    Cheap by default: ``stat`` plus the image header (format and size, no pixels). Images over
    Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused from the
    header alone, never decoded. ``decode=True`` also decodes the pixels exactly as training
    does (:func:`load_rgb`): what ``data.strict=true`` runs.
    """
    path = os.fspath(path)
    problem = regular_file_problem(path)  # the one file rule: a FIFO would block Image.open forever
    if problem is not None:
        return "file vanished" if problem == "no such file" else problem
    try:
        if os.stat(path).st_size == 0:
            return "empty file (0 bytes)"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            # between 1x and 2x the limit Pillow only warns: the size test below refuses those
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_regular_file(path) as f, Image.open(f) as img:
                width, height = img.size
                if limit and width * height > limit:
                    return (f"decompression bomb refused: {width}x{height} = {width * height:,} pixels is over Pillow's "
                            f"decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
                if width < 1 or height < 1:
                    return f"invalid size {width}x{height}"
        if decode:
            load_rgb(path).close()
    except PermissionError:
        return "unreadable: permission denied"
    except Image.DecompressionBombError as exc:
        return f"decompression bomb refused: {exc} (PIL.Image.MAX_IMAGE_PIXELS); not decoded"
    except UnidentifiedImageError:
        return "not an image: format not recognised"
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unusable file", whatever its type
        return f"cannot decode: {first_line(exc)}"
    return None


def check_files(paths: Sequence[str], decode: bool = False) -> dict[str, str]:
    """:func:`check_image_file` over ``paths``: ``{path: reason}`` of the bad ones. Shows progress
    (files/s, bad files so far) on a terminal and logs one summary line when done."""
    reasons: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Progress("file check", total=len(paths), unit="files", log=log) as progress:
            for path in paths:
                reason = check_image_file(path, decode=decode)
                if reason is not None:
                    reasons[path] = reason
                progress.update(1, bad=len(reasons))
            if not paths:
                progress.update(0, bad=0)
    return reasons


def skipped_line(bad: BadFile) -> str:
    """One ``reason<TAB>path`` line of ``skipped.txt``: both through :func:`hymtl.errors.printable`,
    so a name with a newline, a tab, a terminal escape or bytes that are not UTF-8 stays one line
    of valid UTF-8 (the tab between them is the only one)."""
    return f"{printable(bad.reason)}\t{printable(bad.path)}\n"


def format_skipped(bad: Sequence[BadFile], header: str = "") -> str:
    """``skipped.txt``: ``reason<TAB>path`` lines (:func:`skipped_line`), after a ``#`` header."""
    lines = [f"# {printable(line)}\n" for line in header.splitlines()]
    return "".join(lines + [skipped_line(b) for b in bad])


def read_skipped(path: str | os.PathLike) -> list[BadFile]:
    """The entries of a ``skipped.txt`` (one per path: the first reason wins), in file order.
    Paths are as written: escaped by :func:`hymtl.errors.printable`."""
    seen: dict[str, BadFile] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        if not line or line.startswith("#") or "\t" not in line:
            continue
        reason, name = line.split("\t", 1)
        seen.setdefault(name, BadFile(name, reason))
    return list(seen.values())


def summarize_skipped(bad: Sequence[BadFile]) -> str:
    """``"3 files skipped: 2 empty file (0 bytes), 1 broken symlink"`` (most frequent first)."""
    counts: dict[str, int] = {}
    for b in bad:
        kind = b.reason.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(bad)} file{'s' if len(bad) != 1 else ''} skipped: {parts}" if bad else "no files skipped"


_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


class PadToAspect(torch.nn.Module):
    """Pad an image tensor (centred, zeros, as ``CenterCrop`` pads) so that its long side is at
    most ``max_ratio`` times its short side; images within that ratio pass unchanged."""

    def __init__(self, max_ratio: int) -> None:
        super().__init__()
        self.max_ratio = int(max_ratio)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_h = max(0, -(-width // self.max_ratio) - height)
        pad_w = max(0, -(-height // self.max_ratio) - width)
        if not (pad_h or pad_w):
            return image
        return T.functional.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2])

    def extra_repr(self) -> str:  # part of the feature cache's transform fingerprint
        return f"max_ratio={self.max_ratio}"


def build_transforms(preprocessing: Preprocessing, train: bool) -> T.Compose:
    """Eval: resize + center crop (the backbone's recipe). Train: the tutorial's
    RandomResizedCrop + horizontal flip at the backbone's input size and interpolation."""
    interpolation = _INTERPOLATION[preprocessing.interpolation]
    if train:
        geometry = [
            T.RandomResizedCrop(preprocessing.input_size, interpolation=interpolation, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    else:
        max_size = 4 * preprocessing.resize_size
        geometry = [
            # a 4000x3 strip would shrink to 0 rows under max_size: pad it to a ratio that keeps rows
            PadToAspect(max_ratio=max_size // 2),
            # max_size: a 10000x10 strip would otherwise become 256x256000 (GBs) before the crop;
            # capped, it is padded by the crop instead. Aspect ratios up to 4:1 are unaffected.
            T.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True, max_size=max_size),
            T.CenterCrop(preprocessing.input_size),
        ]
    return T.Compose(
        [
            T.ToImage(),
            *geometry,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        ]
    )

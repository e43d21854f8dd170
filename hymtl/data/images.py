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

from hymtl.data.samples import Sample, TargetEncoder
from hymtl.errors import HymtlError, first_line, printable
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


def sample_bytes(sample: Sample | str | os.PathLike) -> bytes:
    """The image's bytes: those a source holds (Parquet), else the file's, read once."""
    if isinstance(sample, Sample):
        return sample.data if sample.data is not None else read_image_bytes(sample.path)
    return read_image_bytes(sample)


def load_rgb(path: str | os.PathLike | Sample, min_size: int | None = None) -> Image.Image:
    """Open an image (a file, or a :class:`~hymtl.data.samples.Sample`: a file or the bytes its
    source holds) as RGB: :func:`sample_bytes` then :func:`decode_rgb_bytes`."""
    return decode_rgb_bytes(sample_bytes(path), min_size)


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

    def __call__(self, sample: Sample | str, make: Callable[[Image.Image], Any], data: bytes | None = None) -> Any | None:
        """``make(image)`` of ``sample`` (a file, or a sample whose bytes its source holds),
        decoded from ``data`` when given (its bytes, read once by the caller), else read here;
        ``None`` when either step fails."""
        path = sample.path if isinstance(sample, Sample) else sample
        if data is None and isinstance(sample, Sample):
            data = sample.data
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
        num_classes: for multi-label samples, the length of their multi-hot targets.
    """

    def __init__(self, samples: Sequence[Sample], transform=None, skip_bad: bool = False,
                 failure_log: str | os.PathLike | None = None, decode_size: int | None = None,
                 num_classes: int | None = None):
        self.samples = list(samples)
        self.target = TargetEncoder(num_classes)
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
        target = self.target(sample)
        if not self.skip_bad:
            return self._prepare(load_rgb(sample, self.decode_size)), target
        item = self.dropper(sample, self._prepare)
        return None if item is None else (item, target)


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


def check_sample(sample: Sample, decode: bool = False) -> str | None:
    """Why ``sample`` cannot be used as an image, or ``None``: :func:`check_image_file` for a
    file, the same header (and, with ``decode``, pixel) checks for the bytes a source holds."""
    if sample.data is None:
        return check_image_file(sample.path, decode=decode)
    if not sample.data:
        return "empty image (0 bytes)"
    return _check_image(io.BytesIO(sample.data), decode)


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
    try:
        with open_regular_file(path) as f:  # the one file rule again: a path swapped for a FIFO meanwhile
            return _check_image(f, decode)
    except PermissionError:
        return "unreadable: permission denied"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def _check_image(source, decode: bool) -> str | None:
    """The header checks (format, size, decompression bomb) of :func:`check_image_file` on an
    open file or bytes; ``decode``: also the pixels, as training decodes them (the same bytes)."""
    limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            # between 1x and 2x the limit Pillow only warns: the size test below refuses those
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if limit and width * height > limit:
                    return (f"decompression bomb refused: {width}x{height} = {width * height:,} pixels is over Pillow's "
                            f"decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
                if width < 1 or height < 1:
                    return f"invalid size {width}x{height}"
        if decode:
            source.seek(0)
            decode_rgb_bytes(source.read()).close()
    except PermissionError:
        return "unreadable: permission denied"
    except Image.DecompressionBombError as exc:
        return f"decompression bomb refused: {exc} (PIL.Image.MAX_IMAGE_PIXELS); not decoded"
    except UnidentifiedImageError:
        return "not an image: format not recognised"
    except Exception as exc:  # noqa: BLE001 - any decoder error means "unusable file", whatever its type
        return f"cannot decode: {first_line(exc)}"
    return None


def check_files(paths: Sequence[str | Sample], decode: bool = False) -> dict[str, str]:
    """:func:`check_image_file` (:func:`check_sample` for samples) over ``paths``: ``{path:
    reason}`` of the bad ones. Shows progress (files/s, bad files so far) on a terminal and logs
    one summary line when done."""
    reasons: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Progress("file check", total=len(paths), unit="files", log=log) as progress:
            for item in paths:
                sample = item if isinstance(item, Sample) else Sample(str(item), 0)
                reason = check_sample(sample, decode=decode)
                if reason is not None:
                    reasons[sample.path] = reason
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


@dataclass(frozen=True)
class AugmentRecipe:
    """The training augmentation: what :func:`build_transforms` adds to a backbone's evaluation
    preprocessing for the training split (``conf/augment/``: ``default``, ``trivial``,
    ``randaug``, ``none``; given to the datamodule as ``data.augment``).

    Args:
        name: the recipe's name (``augment=<name>``), for logs and tables.
        random_crop: the tutorial's ``RandomResizedCrop`` at the input size; ``False``: the
            evaluation resize + center crop.
        flip: a random horizontal flip.
        policy: a torchvision v2 transform applied to the uint8 crop after the geometry
            (``TrivialAugmentWide()``, ``RandAugment(num_ops, magnitude)``), or ``None``.

    Its ``repr`` is part of the training transform's, so the feature cache's fingerprint of
    augmented views (:class:`hymtl.features.MultiViewDataset`'s ``recipe``) follows the recipe.
    """

    name: str = "default"
    random_crop: bool = True
    flip: bool = True
    policy: Any = None

    def __post_init__(self) -> None:
        for key in ("random_crop", "flip"):
            if not isinstance(getattr(self, key), bool):
                raise HymtlError(f"augment.{key} must be true or false, got {printable(repr(getattr(self, key)))}")
        if self.policy is not None and not callable(self.policy):
            raise HymtlError(f"augment.policy must be a torchvision transform (a _target_ config), "
                             f"got {printable(repr(self.policy))}")


DEFAULT_AUGMENT = AugmentRecipe()


def _eval_geometry(preprocessing: Preprocessing, interpolation) -> list:
    """Resize the shorter side to ``resize_size`` (bounded for extreme strips), before the crop."""
    max_size = 4 * preprocessing.resize_size
    return [
        # a 4000x3 strip would shrink to 0 rows under max_size: pad it to a ratio that keeps rows
        PadToAspect(max_ratio=max_size // 2),
        # max_size: a 10000x10 strip would otherwise become 256x256000 (GBs) before the crop;
        # capped, it is padded by the crop instead. Aspect ratios up to 4:1 are unaffected.
        T.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True, max_size=max_size),
    ]


def _to_normalized(preprocessing: Preprocessing) -> list:
    return [T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std))]


def build_transforms(preprocessing: Preprocessing, train: bool, augment: AugmentRecipe | None = None) -> T.Compose:
    """Eval: resize + center crop (the backbone's recipe). Train: the augmentation ``augment``
    (default: the tutorial's RandomResizedCrop + horizontal flip) at the backbone's input size
    and interpolation."""
    interpolation = _INTERPOLATION[preprocessing.interpolation]
    augment = augment if augment is not None else DEFAULT_AUGMENT
    if train and augment.random_crop:
        geometry = [T.RandomResizedCrop(preprocessing.input_size, interpolation=interpolation, antialias=True)]
    else:
        geometry = [*_eval_geometry(preprocessing, interpolation), T.CenterCrop(preprocessing.input_size)]
    if train:
        geometry += [T.RandomHorizontalFlip()] if augment.flip else []
        geometry += [augment.policy] if augment.policy is not None else []
    return T.Compose([T.ToImage(), *geometry, *_to_normalized(preprocessing)])


#: test-time augmentations (``tta=``): the views of an image whose probabilities are averaged
TTA_CHOICES = ("none", "flip", "five_crop")


class StackViews(torch.nn.Module):
    """Several views of one image as a ``(V, C, H, W)`` tensor: the crops of ``FiveCrop`` (a
    tuple), or the image and its mirror image (``mirror=True``), or the image alone."""

    def __init__(self, mirror: bool = False) -> None:
        super().__init__()
        self.mirror = bool(mirror)

    def forward(self, views) -> torch.Tensor:
        if isinstance(views, (tuple, list)):
            return torch.stack([torch.as_tensor(v) for v in views])
        image = torch.as_tensor(views)
        return torch.stack([image, image.flip(-1)]) if self.mirror else image.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"mirror={self.mirror}"


def build_test_views(preprocessing: Preprocessing, tta: str) -> T.Compose:
    """The views test-time augmentation ``tta`` (:data:`TTA_CHOICES`) averages, as one
    ``(V, 3, S, S)`` tensor per image: ``none`` the evaluation view alone; ``flip`` it and its
    mirror image; ``five_crop`` the four corner crops and the center crop of the resized image
    (the center one is the evaluation view)."""
    if tta not in TTA_CHOICES:
        raise HymtlError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {printable(str(tta))}")
    interpolation = _INTERPOLATION[preprocessing.interpolation]
    geometry = _eval_geometry(preprocessing, interpolation)
    if tta == "five_crop":
        views = [T.FiveCrop(preprocessing.input_size), StackViews()]
    else:
        views = [T.CenterCrop(preprocessing.input_size), StackViews(mirror=tta == "flip")]
    return T.Compose([T.ToImage(), *geometry, *views, *_to_normalized(preprocessing)])

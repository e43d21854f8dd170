"""Image folders as a LightningDataModule: scanning, splits, robust RGB loading, transforms, download.

Layout rules (a superset of torchvision's ``ImageFolder``):

* ``root/train/<class>/…`` and ``root/{val,valid,validation}/<class>/…``; ``root/test/<class>/…``
  when present is the test split, otherwise val doubles as test (the ants/bees case);
* ``root/<class>/…`` only: split deterministically and stratified by ``val_fraction`` and ``seed``.

Class order is the sorted class-folder names. Images of any common format and letter case
are read with their EXIF orientation applied and converted to RGB; hidden files and folders
are ignored; files nested below a class folder belong to that class.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2 as T

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from hymtl.backbones import Preprocessing
from hymtl.errors import DataError, DownloadError
from hymtl.features import Features, file_identity, view_seed
from hymtl.fileio import atomic_write_text, download_file, sha256_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# torchvision.datasets.folder.IMG_EXTENSIONS: ImageFolder's rules (no .gif), for exact tutorial counts
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_DIR_NAMES = ("val", "valid", "validation")
MANIFEST_DIR = Path(__file__).parent / "manifests"


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass(frozen=True)
class SplitLayout:
    """Where each split comes from in a root folder."""

    train: Path | None  # None: a flat <class>/ root that must be split
    val: Path | None
    test: Path | None

    @property
    def test_source(self) -> str:
        return "test" if self.test is not None else "val"


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def is_image_file(path: str | os.PathLike, extensions: Collection[str] | None = None) -> bool:
    """A visible file whose lower-cased extension is in ``extensions`` (default: ``IMAGE_EXTENSIONS``)."""
    name = os.path.basename(path)
    return _visible(name) and os.path.splitext(name)[1].lower() in (extensions or IMAGE_EXTENSIONS)


def find_classes(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the visible sub-folders: the class names."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and _visible(e.name))


def scan_split(
    folder: str | os.PathLike, class_names: Sequence[str], extensions: Collection[str] | None = None
) -> list[Sample]:
    """All image files below ``folder/<class>/`` (recursively, hidden entries skipped), sorted."""
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = Path(folder) / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            samples.extend(
                Sample(os.path.join(dirpath, f), label) for f in sorted(filenames) if is_image_file(f, extensions)
            )
    return samples


def resolve_layout(root: str | os.PathLike) -> SplitLayout:
    """Find the train/val/test folders of ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    subdirs = {d.lower(): root / d for d in find_classes(root)}
    val = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)
    if "train" in subdirs:
        return SplitLayout(train=subdirs["train"], val=val, test=subdirs.get("test"))
    return SplitLayout(train=None, val=None, test=subdirs.get("test"))


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class split: the same ``seed`` gives the same split on every machine."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        random.Random(f"{seed}:{label}").shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def load_rgb(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied (first frame of animations).

    ``min_size``: a JPEG larger than needed is decoded at a reduced scale (libjpeg's DCT
    scaling, PIL ``draft``: 1/2, 1/4 or 1/8) whose both sides stay >= ``min_size``; a
    2592x1944 photo headed for a 256-pixel resize decodes ~8x faster. Other formats ignore it.
    """
    with Image.open(path) as img:
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


class ImageSampleDataset(Dataset):
    """``(image tensor, label)`` pairs from a list of samples.

    ``skip_bad``: a file that fails to decode gives ``None`` instead of an exception (dropped
    by :func:`collate_skipping`), is logged once per process and appended to ``failure_log``
    (``skipped.txt``; appends of one short line are atomic, so DataLoader workers can share it).
    """

    def __init__(self, samples: Sequence[Sample], transform=None, skip_bad: bool = False,
                 failure_log: str | os.PathLike | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad
        self.failure_log = failure_log
        self._reported: set[str] = set()

    #: decode JPEGs at a reduced scale whose sides stay >= this (see load_rgb); set by the DataModule
    decode_size: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        if not self.skip_bad:
            image = load_rgb(sample.path, self.decode_size)
            return (self.transform(image) if self.transform else image), sample.label
        try:
            image = load_rgb(sample.path, self.decode_size)
        except Exception as exc:  # noqa: BLE001 - any decoder error: skip the file, keep training
            self._report(sample.path, f"cannot decode: {_one_line(exc)}{RUNTIME_SUFFIX}")
            return None
        try:  # geometry can fail on a valid file too (a 10000x2 strip resized to 0 rows)
            return (self.transform(image) if self.transform else image), sample.label
        except Exception as exc:  # noqa: BLE001
            self._report(sample.path, f"cannot transform {image.width}x{image.height}: "
                                      f"{_one_line(exc)}{RUNTIME_SUFFIX}")
            return None

    def _report(self, path: str, reason: str) -> None:
        if path in self._reported:
            return
        self._reported.add(path)
        log.warning("skipping %s: %s", path, reason)
        if self.failure_log:
            try:
                with open(self.failure_log, "a", encoding="utf-8") as f:
                    f.write(f"{reason}\t{_escape(path)}\n")
            except OSError as exc:
                log.warning("could not record the skipped file in %s: %s", self.failure_log, exc)


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
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else "file vanished"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot stat: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"  # a FIFO would block Image.open forever
    if info.st_size == 0:
        return "empty file (0 bytes)"
    limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            # between 1x and 2x the limit Pillow only warns: the size test below refuses those
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
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
        return f"cannot decode: {_one_line(exc)}"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _escape(path: str) -> str:
    """Paths on one line of skipped.txt (a name may hold a tab or a newline)."""
    return path.encode("unicode_escape").decode("ascii") if any(c in path for c in "\t\n\r\\") else path


def format_skipped(bad: Sequence[BadFile], header: str = "") -> str:
    """``skipped.txt``: ``reason<TAB>path`` lines, after a ``#`` header."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{b.reason}\t{_escape(b.path)}" for b in bad]
    return "\n".join(lines) + "\n"


def read_skipped(path: str | os.PathLike) -> list[BadFile]:
    """The entries of a ``skipped.txt`` (one per path: the first reason wins), in file order."""
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


def collate_skipping(items: Sequence):
    """``default_collate`` without the ``None`` items (files that failed to decode); ``None``
    when the whole batch failed (:class:`SkippingDataLoader` then drops it)."""
    items = [item for item in items if item is not None]
    return default_collate(items) if items else None


class SkippingDataLoader(DataLoader):
    """A DataLoader that never yields a ``None`` batch (every file of it failed to decode).

    Lightning skips empty training batches itself but not evaluation ones; filtering here
    keeps the model's steps free of special cases.
    """

    def __iter__(self):
        return (batch for batch in super().__iter__() if batch is not None)


def worker_init(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C reaches the whole process group, and the main
    process finishes its batch and saves a checkpoint before stopping (workers dying first would
    end that batch in an error). Keeps Lightning's worker seeding (``seed_everything(workers=True)``),
    which a DataLoader with its own ``worker_init_fn`` would otherwise lose."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


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
        geometry = [
            # max_size: a 10000x10 strip would otherwise become 256x256000 (GBs) before the crop;
            # capped, it is padded by the crop instead. Aspect ratios up to 4:1 are unaffected.
            T.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True,
                     max_size=4 * preprocessing.resize_size),
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


def default_num_workers() -> int:
    """One worker per core the process may use, at most 8 (decoding JPEGs is the bottleneck)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores))


class MultiViewDataset(Dataset):
    """Each image decoded once, as a ``(1 + num_views, 3, H, W)`` tensor: the eval view, then
    ``num_views`` training-augmented views; view ``i`` is drawn with the seed
    :func:`hymtl.features.view_seed` ``(seed, path, i)``, so it is the same tensor in every run
    and worker. The :class:`hymtl.features.ViewSource` of the feature cache; a file that fails
    to decode gives ``None`` (the extractor leaves it out).
    """

    def __init__(self, samples: Sequence[Sample], preprocessing: Preprocessing, num_views: int = 0, seed: int = 0):
        self.samples = list(samples)
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.decode_size = preprocessing.resize_size
        self.eval_transform = build_transforms(preprocessing, train=False)
        self.train_transform = build_transforms(preprocessing, train=True)
        # everything that shapes the pixels of a view: the cache fingerprint of these views
        self.recipe = (f"eval={self.eval_transform!r}\ntrain={self.train_transform!r}\n"
                       f"seed={self.seed}\ndecode_size={self.decode_size}")

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self, index: int) -> tuple[str, int, int]:
        return file_identity(self.samples[index].path)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        path = self.samples[index].path
        try:
            image = load_rgb(path, self.decode_size)
        except Exception as exc:  # noqa: BLE001 - a file that fails to decode is left out, not fatal
            log.warning("skipping %s: cannot decode: %s", path, exc)
            return None
        views = [self.eval_transform(image)]
        for view in range(1, self.num_views + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, os.path.abspath(path), view))
                views.append(self.train_transform(image))
        return torch.stack(views)


class FeatureTensorDataset(Dataset):
    """``(feature vector, label)`` pairs from cached backbone features ``(N, V, F)``.

    ``random_view``: each access returns one of the image's V cached views (plain + augmented)
    at random, the cached stand-in for on-the-fly augmentation; otherwise view 0 (plain).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, random_view: bool = False):
        if features.dim() != 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"features (N, V, F) and labels (N,) expected, got {tuple(features.shape)}, {tuple(labels.shape)}")
        self.features, self.labels, self.random_view = features, labels, random_view

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int):
        view = int(torch.randint(self.features.shape[1], ())) if self.random_view else 0
        return self.features[index, view], self.labels[index]


# --------------------------------------------------------------------------- download
def _safe_extract(archive: zipfile.ZipFile, dest: Path) -> None:
    """Extract refusing absolute paths, ``..`` components and symlinks (zip-slip)."""
    dest = dest.resolve()
    for info in archive.infolist():
        name = info.filename
        is_symlink = (info.external_attr >> 16) & 0o170000 == 0o120000
        target = (dest / name).resolve()
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or is_symlink or not target.is_relative_to(dest):
            raise DownloadError(f"refusing unsafe archive member {name!r}")
    archive.extractall(dest)


def verify_manifest(folder: Path, manifest: Path) -> None:
    """Check every ``sha256  relative/path`` line of ``manifest`` against ``folder``."""
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(maxsplit=1)
        path = folder / rel.lstrip("*")
        if not path.is_file():
            raise DownloadError(f"downloaded data lacks {rel}")
        if sha256_file(path) != digest:
            raise DownloadError(f"checksum mismatch for {rel} in the downloaded data")


def download_and_extract(url: str, root: Path, sha256: str | None = None, manifest: Path | None = None) -> Path:
    """Fetch a zip of an image folder and move it into place at ``root`` atomically.

    ``sha256`` checks the zip itself; ``manifest`` (``sha256sum`` format) checks every
    extracted file. A failure at any step leaves nothing at ``root``.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.", dir=root.parent) as tmp:
        tmp = Path(tmp)
        log.info("downloading %s", url)
        archive_path = download_file(url, tmp / "archive.zip", sha256=sha256)
        try:
            with zipfile.ZipFile(archive_path) as archive:
                _safe_extract(archive, tmp / "extracted")
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{url} is not a valid zip: {exc}") from None
        entries = [p for p in (tmp / "extracted").iterdir() if _visible(p.name)]
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
def _exclusive_lock(path: Path):
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


# --------------------------------------------------------------------------- the DataModule
class ImageFolderDataModule(LightningDataModule):
    """Train/val/test splits of an image folder (see the module docstring for the layout).

    Args:
        root: the folder. When missing and ``download_url`` is set, it is downloaded.
        batch_size: per-device batch size.
        num_workers: DataLoader workers; ``"auto"``: one per usable core (max 8).
        val_fraction, seed: the split of a flat ``<class>/`` folder.
        download_url, sha256, manifest: where to fetch ``root`` from and how to check it.
        preprocessing: the backbone's :class:`Preprocessing` (set by the entry point from the model).
        extensions: image file extensions to read (any case, dot optional); default
            ``IMAGE_EXTENSIONS``. ``TORCHVISION_EXTENSIONS`` follows ``ImageFolder`` exactly.
        strict: decode every file before training and stop with a :class:`DataError` at the
            first sign of a bad file or an unusable class folder (default: skip and report them).
        skipped_file: where to write the skipped files (``reason<TAB>path``); the train entry
            point sets ``<run dir>/skipped.txt``.
    """

    def __init__(
        self,
        root: str = "data/hymenoptera_data",
        batch_size: int = 32,
        num_workers: int | str = "auto",
        val_fraction: float = 0.2,
        seed: int = 0,
        download_url: str | None = None,
        sha256: str | None = None,
        manifest: str | None = None,
        preprocessing: Preprocessing | dict | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        extensions: Sequence[str] | None = None,
        strict: bool = False,
        skipped_file: str | os.PathLike | None = None,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.root = Path(os.path.expanduser(str(root)))
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.download_url = download_url
        self.sha256 = sha256
        self.manifest = (MANIFEST_DIR / manifest if manifest and not os.path.isabs(manifest) else manifest)
        self.preprocessing = Preprocessing.from_dict(preprocessing) if isinstance(preprocessing, dict) else preprocessing
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.extensions = frozenset("." + e.lower().lstrip(".") for e in extensions) if extensions else IMAGE_EXTENSIONS
        self.strict = bool(strict)
        self.skipped_file = skipped_file
        self.skipped: list[BadFile] = []  # left out by the up-front check (runtime failures: skipped.txt)
        self._class_names: list[str] | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    # -- discovery -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the folder when it is missing and a URL is known (rank 0 only, by Lightning)."""
        if self.root.is_dir():
            return
        if not self.download_url:
            raise DataError(f"data folder not found: {self.root}")
        # torchrun starts every rank at once, each calling this before the Trainer exists: the
        # first to take the lock downloads, the others wait and then find the folder in place
        with _exclusive_lock(self.root.parent / f".{self.root.name}.lock"):
            if self.root.is_dir():
                return
            download_and_extract(self.download_url, self.root, sha256=self.sha256,
                                 manifest=Path(self.manifest) if self.manifest else None)

    @property
    def layout(self) -> SplitLayout:
        return resolve_layout(self.root)

    @property
    def class_names(self) -> list[str]:
        """Sorted class-folder names of the training split that hold at least one usable image."""
        if self._class_names is None:
            self._discover()
        return self._class_names

    def _discover(self) -> None:
        """Scan every split, check every file (see :func:`check_image_file`), drop class folders
        without a usable training image, split a flat folder; record and report what was left out."""
        layout = self.layout
        source = layout.train if layout.train is not None else self.root
        names = find_classes(source)
        names = [n for n in names if layout.train is not None or n.lower() not in ("test",)]
        if len(names) < 2:
            raise DataError(f"need at least two class folders in {source}, found {names}")
        ext = self.extensions
        train = scan_split(source, names, ext)
        val = scan_split(layout.val, names, ext) if layout.val is not None else None
        test = scan_split(layout.test, names, ext) if layout.test is not None else None
        every = train + (val or []) + (test or [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            reasons = {s.path: r for s in every if (r := check_image_file(s.path, decode=self.strict)) is not None}
        bad = [BadFile(s.path, reasons[s.path]) for s in every if s.path in reasons]
        counts = [0] * len(names)
        for s in train:
            counts[s.label] += s.path not in reasons
        empty = [name for name, n in zip(names, counts) if n == 0]
        bad += [BadFile(str(Path(source) / name), "class folder without a usable image: class ignored") for name in empty]
        self.skipped = bad
        self._write_skipped(bad, len(every))
        if bad:
            first = bad[0]
            if self.strict:
                raise DataError(f"data.strict=true: {summarize_skipped(bad)} in {self.root}; first: "
                                f"{first.path} ({first.reason})" + self._see_skipped())
            log.warning("%s of %d in %s%s", summarize_skipped(bad), len(every), self.root, self._see_skipped())
            for b in bad[:20]:
                log.warning("  skipped %s: %s", b.path, b.reason)
            if len(bad) > 20:
                log.warning("  ... and %d more", len(bad) - 20)
        usable = [name for name, n in zip(names, counts) if n > 0]
        if len(usable) < 2:
            found = f"only {usable}" if usable else "none"
            raise DataError(f"need at least two classes with usable images in {source}, found {found} "
                            f"({summarize_skipped(bad)})" + self._see_skipped())
        relabel = {names.index(name): i for i, name in enumerate(usable)}

        def keep(samples: list[Sample]) -> list[Sample]:
            return [Sample(s.path, relabel[s.label]) for s in samples if s.path not in reasons and s.label in relabel]

        train, val, test = keep(train), keep(val) if val is not None else None, keep(test) if test is not None else None
        if val is None:
            train, val = stratified_split(train, self.val_fraction, self.seed)
        self._class_names = usable
        self.train_samples, self.val_samples = train, val
        self.test_samples = test if test is not None else list(val)

    def _see_skipped(self) -> str:
        return f"; list in {self.skipped_file}" if self.skipped_file else ""

    def _write_skipped(self, bad: Sequence[BadFile], checked: int) -> None:
        if not self.skipped_file:
            return
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.is_global_zero:
            return
        header = (f"files left out of the run: reason<TAB>path ({len(bad)} of {checked} checked in {self.root})\n"
                  f"decode failures during training are appended with the suffix '{RUNTIME_SUFFIX.strip()}'")
        atomic_write_text(self.skipped_file, format_skipped(bad, header))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is None:
            raise DataError("ImageFolderDataModule.preprocessing is not set (take it from the backbone)")
        if self._class_names is None:  # scanned and checked once, also when setup runs per stage
            self._discover()
        for split, samples in (("train", self.train_samples), ("val", self.val_samples)):
            if not samples:
                raise DataError(f"no images in the {split} split of {self.root}")

    @property
    def test_split_name(self) -> str:
        """``"test"`` when the folder has one, else ``"val"`` (val doubles as test)."""
        return self.layout.test_source

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, samples: Sequence[Sample], train: bool) -> DataLoader:
        dataset = ImageSampleDataset(samples, build_transforms(self.preprocessing, train=train),
                                     skip_bad=True, failure_log=self.skipped_file)
        dataset.decode_size = self.preprocessing.resize_size  # big JPEGs: reduced-scale decoding
        sampler = None if train else self._eval_sampler(dataset)
        return SkippingDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate_skipping,
            worker_init_fn=worker_init,
            shuffle=train,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        if self.serves_features("fit"):
            return self._feature_loader(self.train_samples, train=True)
        return self._loader(self.train_samples, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.serves_features("fit"):
            return self._feature_loader(self.val_samples, train=False)
        return self._loader(self.val_samples, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.serves_features("test"):
            return self._feature_loader(self.test_samples, train=False)
        return self._loader(self.test_samples, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, train=False)

    # -- cached backbone features (hymtl.features) ---------------------------------------
    def serve_features(self, extractor, num_views: int = 0, until_epoch: int | None = None) -> None:
        """Serve backbone features from ``extractor`` (a :class:`hymtl.features.FeatureExtractor`)
        instead of images: for the whole run and its test when ``until_epoch`` is ``None`` (a
        frozen backbone), else while ``trainer.current_epoch < until_epoch`` (the head-only phase
        of two-phase training: the Trainer must then reload dataloaders at that epoch). Each
        training image contributes its plain view plus ``num_views`` augmented views.
        """
        self._feature_plan = (extractor, int(num_views), until_epoch)
        self._feature_sets: dict = {}

    def serves_features(self, stage: str) -> bool:
        """Whether the ``stage`` ("fit", "test", "predict") loaders give features right now."""
        plan = getattr(self, "_feature_plan", None)
        if plan is None or stage == "predict":
            return False
        until = plan[2]
        if until is None:
            return True
        trainer = self.trainer
        return stage == "fit" and (trainer.current_epoch if trainer is not None else 0) < until

    def _feature_loader(self, samples: Sequence[Sample], train: bool) -> DataLoader:
        extractor, num_views, _ = self._feature_plan
        key = (train, tuple(s.path for s in samples))
        if key not in self._feature_sets:
            source = MultiViewDataset(samples, self.preprocessing, num_views if train else 0, self.seed)
            features = self._extract_features(extractor, source)
            labels = torch.tensor([samples[i].label for i in features.indices], dtype=torch.long)
            self._feature_sets[key] = FeatureTensorDataset(features.tensor, labels, random_view=train)
        dataset = self._feature_sets[key]
        # tensors already in memory: worker processes would only add start-up time
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, num_workers=0,
                          sampler=None if train else self._eval_sampler(dataset))

    def _extract_features(self, extractor, source):
        """All of ``source``'s features. Under DDP each rank runs the backbone over its own share
        (``range(rank, N, world_size)``, filling the cache for those images) on its own device,
        and the shares are gathered once, so every rank holds the whole split."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return extractor.extract(source)
        extractor.device = trainer.strategy.root_device  # not cuda:0 for every rank
        mine = extractor.extract(source, indices=range(trainer.global_rank, len(source), trainer.world_size))
        shares: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, (mine.indices, mine.tensor.cpu()))
        by_index = {i: t for indices, tensor in shares for i, t in zip(indices, tensor)}
        kept = sorted(by_index)
        tensor = torch.stack([by_index[i] for i in kept]) if kept else mine.tensor[:0]
        return Features(kept, tensor)

    def _eval_sampler(self, dataset) -> Sampler | None:
        """Under DDP, val/test shards without repeats: Lightning's ``DistributedSampler`` pads
        the split with repeated samples to equal lengths, which skews the synced metrics.
        Ranks may then differ by one batch, which evaluation allows (no per-step collective)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1 or len(dataset) < trainer.world_size:
            return None  # Lightning's own sampler: every rank needs at least one sample
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                            rank=trainer.global_rank, shuffle=False)

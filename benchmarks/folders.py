"""Benchmark image folders that behave differently from ants/bees, built offline and deterministically.

    .venv/bin/python benchmarks/folders.py --out ~/.cache/hymtl/bench_folders [--only NAME ...]
        [--source ../shared/data/hymenoptera_data] [--small N]

The defaults of each training mode are chosen by measurement on ants/bees *and* on folders
unlike it. There is no internet, so each folder is made here, from the ants/bees photos or
drawn procedurally (PIL), in the layout hymtl reads (``train/<class>/*.jpg``,
``val/<class>/*.jpg``; val doubles as test):

* ``gray_lines``   ants/bees as grayscale line drawings (smoothed edge map, inverted, 3-channel);
* ``crops``        ants/bees as one heavy random crop per photo (25-40% of its area), upscaled;
* ``imbalanced``   ants/bees, train bees subsampled to 1:5; val balanced (bees cut to the ants' count);
* ``ten_class_3k`` 10 procedural classes, 300 train + 60 val each (224 px): five textures inside a
                   random region (stripes, checkerboard, dots, rings, waves: easy for frozen ImageNet
                   features) and polygons with 3-7 sides (hard for them: counting corners, jittered
                   vertices, any size, colour, rotation), over gradient backgrounds with clutter,
                   blur and noise: room for fine-tuning to beat a linear probe;
* ``many_classes`` 24 procedural classes (the textures, polygons 3-8, stars 4-8, circle, ellipse,
                   cross, crescent, semicircle, arrow, L, T), 20 train + 10 val each.
* ``digits``       scikit-learn's bundled handwritten digits (8x8, 16 gray levels; it installs with
                   the package, no download) scaled up to 112 px with a random shift, scale and
                   rotation: 10 classes, 120 train + 50 val each. Far from ImageNet: no texture, no
                   colour, the class is in a few blurry strokes.

Every image is drawn from its own random stream (seeded by folder, split, class and index), so
a rebuild gives byte-identical files whatever order or subset is built. A folder is built into
a hidden temporary folder beside its target and renamed into place when complete, with a
``.build.json`` (what was built: version, seed, ``--small``, source fingerprint) written last; a
folder whose ``.build.json`` matches is skipped, a leftover temporary folder is never taken for
a build (it is removed when its process is gone). Each folder holds a ``README.txt`` saying how
it was made. ``--small N`` caps every class of every split at ``N`` images (tests, smoke runs).

Importable: :func:`build_folder`, :func:`build_all`, :data:`FOLDERS`, :func:`folder_counts`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: hymtl is the checkout's
    sys.path.insert(0, str(REPO))

from hymtl.data.folders import find_classes, resolve_layout, scan_split  # noqa: E402
from hymtl.data.images import load_rgb  # noqa: E402
from hymtl.errors import DataError  # noqa: E402

DEFAULT_OUT = Path("~/.cache/hymtl/bench_folders").expanduser()
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "hymenoptera_data"
SEED = 1234
JPEG_QUALITY = 90
SIZE = 224           # procedural canvas (px)
SOURCE_SHORT = 256   # derived folders: the photo's short side before the edit
IMBALANCE = 5        # imbalanced: train ants per train bee
MARKER = ".build.json"


# --------------------------------------------------------------------------- random streams
def rng_for(*key: object) -> tuple[random.Random, np.random.Generator]:
    """A Python and a NumPy random stream for one image, from its key alone (not the build order)."""
    text = ":".join(str(k) for k in key)
    digest = hashlib.sha256(text.encode()).digest()
    return random.Random(digest), np.random.default_rng(int.from_bytes(digest[:8], "little"))


def jpeg_bytes(img: Image.Image) -> bytes:
    """The image as a baseline JPEG (no metadata): the same pixels give the same bytes."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# --------------------------------------------------------------------------- procedural drawing
def _lum(c: Sequence[int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colour(rnd: random.Random) -> tuple[int, int, int]:
    return (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))


def _contrasting(rnd: random.Random, against: Sequence[Sequence[int]], min_diff: float = 70) -> tuple[int, int, int]:
    """A random colour whose luminance differs by ``min_diff`` from each colour of ``against``."""
    for _ in range(100):
        c = _colour(rnd)
        if all(abs(_lum(c) - _lum(a)) >= min_diff for a in against):
            return c
    return (255, 255, 255) if _lum(against[0]) < 128 else (0, 0, 0)


_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5


def _background(rnd: random.Random, nrng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int]]:
    """A linear gradient between two close colours in a random direction, with small clutter
    (short lines, dots) in random colours; returns the image and its mean colour."""
    a = _colour(rnd)
    b = tuple(max(0, min(255, v + rnd.randint(-60, 60))) for v in a)
    theta = rnd.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + _GRID_X * math.cos(theta) + _GRID_Y * math.sin(theta), 0, 1)[..., None]
    arr = np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rnd.randint(6, 16)):
        x, y = rnd.uniform(0, SIZE), rnd.uniform(0, SIZE)
        if rnd.random() < 0.5:
            length, angle = rnd.uniform(5, 22), rnd.uniform(0, math.pi)
            draw.line([(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
                      fill=_colour(rnd), width=rnd.randint(1, 2))
        else:
            r = rnd.uniform(1.5, 5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rnd))
    mean = tuple(int(v) for v in np.asarray(img)[::8, ::8].reshape(-1, 3).mean(0))
    return img, mean


def _rotate(points, cx: float, cy: float, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _region_mask(rnd: random.Random) -> Image.Image:
    """Where a texture shows: a rotated ellipse or rectangle of 35-70% of the canvas, near the centre."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    area = rnd.uniform(0.35, 0.70) * SIZE * SIZE
    aspect = math.exp(rnd.uniform(-0.4, 0.4))
    cx, cy = SIZE / 2 + rnd.uniform(-20, 20), SIZE / 2 + rnd.uniform(-20, 20)
    angle = rnd.uniform(0, math.pi)
    if rnd.random() < 0.5:
        w = math.sqrt(area * aspect / math.pi)
        h = math.sqrt(area / aspect / math.pi)
        pts = [(w * math.cos(2 * math.pi * k / 64), h * math.sin(2 * math.pi * k / 64)) for k in range(64)]
    else:
        w, h = math.sqrt(area * aspect) / 2, math.sqrt(area / aspect) / 2
        pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
    ImageDraw.Draw(mask).polygon(_rotate(pts, cx, cy, angle), fill=255)
    return mask


def _texture(kind: str, rnd: random.Random) -> Image.Image:
    """A texture pattern as an ``L`` mask (255: foreground colour) over a canvas 1.5x the size,
    rotated at random and cropped back to the canvas."""
    big = SIZE * 3 // 2  # > SIZE * sqrt(2): the rotated crop has no corners left empty
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "stripes":
        period = rnd.uniform(8, 22)
        width = max(2, round(period * rnd.uniform(0.3, 0.5)))
        for k in range(int(big / period) + 1):
            draw.line([(0, k * period), (big, k * period)], fill=255, width=width)
    elif kind == "checkerboard":
        cell = rnd.uniform(8, 22)
        n = int(big / cell) + 1
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell - 1, (j + 1) * cell - 1], fill=255)
    elif kind == "dots":
        period = rnd.uniform(10, 22)
        radius = period * rnd.uniform(0.18, 0.32)
        hexagonal = rnd.random() < 0.5
        n = int(big / period) + 1
        for j in range(n):
            shift = period / 2 if hexagonal and j % 2 else 0.0
            for i in range(n):
                x = i * period + shift + rnd.uniform(-1.5, 1.5)
                y = j * period * (0.866 if hexagonal else 1.0) + rnd.uniform(-1.5, 1.5)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    elif kind == "rings":
        period = rnd.uniform(9, 20)
        width = max(2, round(period * rnd.uniform(0.3, 0.5)))
        cx, cy = big / 2 + rnd.uniform(-30, 30), big / 2 + rnd.uniform(-30, 30)
        for k in range(1, int(big / period)):
            r = k * period
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    elif kind == "waves":
        period = rnd.uniform(12, 24)
        amplitude = rnd.uniform(4, 10)
        wavelength = rnd.uniform(24, 56)
        width = max(2, round(period * rnd.uniform(0.25, 0.4)))
        phase = rnd.uniform(0, 2 * math.pi)
        xs = np.arange(0, big + 4, 4, dtype=np.float64)
        for k in range(int(big / period) + 1):
            ys = k * period + amplitude * np.sin(2 * math.pi * xs / wavelength + phase)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=255, width=width)
    else:
        raise ValueError(f"unknown texture {kind}")
    mask = mask.rotate(rnd.uniform(0, 180), resample=Image.BILINEAR)
    offset = (big - SIZE) // 2
    return mask.crop((offset, offset, offset + SIZE, offset + SIZE))


def _polygon_points(n: int, radius: float, rnd: random.Random, jitter: float = 0.15):
    """``n`` vertices on a circle, each angle jittered by up to ``jitter`` of a side, radii +-12%."""
    step = 2 * math.pi / n
    return [(radius * rnd.uniform(0.88, 1.12) * math.cos(k * step + rnd.uniform(-jitter, jitter) * step),
             radius * rnd.uniform(0.88, 1.12) * math.sin(k * step + rnd.uniform(-jitter, jitter) * step))
            for k in range(n)]


def _ellipse_points(rx: float, ry: float, start: float = 0.0, stop: float = 2 * math.pi, n: int = 64):
    return [(rx * math.cos(start + (stop - start) * k / (n - 1)), ry * math.sin(start + (stop - start) * k / (n - 1)))
            for k in range(n)]


def _shape_mask(kind: str, rnd: random.Random) -> Image.Image:
    """One shape as an ``L`` mask: random size (radius 28-82 px), rotation and position (inside the
    central crop an evaluation transform keeps)."""
    radius = rnd.uniform(28, 82)
    margin = radius * 1.15 + 16
    cx, cy = rnd.uniform(margin, SIZE - margin), rnd.uniform(margin, SIZE - margin)
    angle = rnd.uniform(0, 2 * math.pi)
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    polys: list[tuple[list, int]] = []  # (points, fill): drawn in order, 0 cuts out
    r = radius
    if kind.startswith("polygon"):
        polys.append((_polygon_points(int(kind[len("polygon"):]), r, rnd), 255))
    elif kind.startswith("star"):
        k = int(kind[len("star"):])
        inner = rnd.uniform(0.38, 0.55)
        step = math.pi / k
        polys.append(([((r if i % 2 == 0 else r * inner) * rnd.uniform(0.92, 1.08) * math.cos(i * step),
                        (r if i % 2 == 0 else r * inner) * rnd.uniform(0.92, 1.08) * math.sin(i * step))
                       for i in range(2 * k)], 255))
    elif kind == "circle":
        polys.append((_ellipse_points(r, r * rnd.uniform(0.88, 1.0)), 255))
    elif kind == "ellipse":
        polys.append((_ellipse_points(r, r * rnd.uniform(0.38, 0.6)), 255))
    elif kind == "semicircle":
        polys.append((_ellipse_points(r, r, 0, math.pi) + [(0.0, 0.0)], 255))
    elif kind == "crescent":
        polys.append((_ellipse_points(r, r), 255))
        shift = r * rnd.uniform(0.35, 0.55)
        polys.append(([(x + shift, y) for x, y in _ellipse_points(r * 0.9, r * 0.9)], 0))
    elif kind == "cross":
        w = r * rnd.uniform(0.28, 0.4)
        polys.append(([(-r, -w), (r, -w), (r, w), (-r, w)], 255))
        polys.append(([(-w, -r), (w, -r), (w, r), (-w, r)], 255))
    elif kind == "arrow":
        w, head = r * rnd.uniform(0.2, 0.3), r * rnd.uniform(0.45, 0.6)
        polys.append(([(-r, -w), (r - head, -w), (r - head, -2.2 * w), (r, 0), (r - head, 2.2 * w),
                       (r - head, w), (-r, w)], 255))
    elif kind == "L":
        w = r * rnd.uniform(0.3, 0.42)
        polys.append(([(-r * 0.6, -r), (-r * 0.6 + w, -r), (-r * 0.6 + w, r - w), (r * 0.6, r - w),
                       (r * 0.6, r), (-r * 0.6, r)], 255))
    elif kind == "T":
        w = r * rnd.uniform(0.3, 0.42)
        polys.append(([(-r, -r), (r, -r), (r, -r + w), (w / 2, -r + w), (w / 2, r), (-w / 2, r),
                       (-w / 2, -r + w), (-r, -r + w)], 255))
    else:
        raise ValueError(f"unknown shape {kind}")
    for points, fill in polys:
        draw.polygon(_rotate(points, cx, cy, angle), fill=fill)
    if rnd.random() < 0.45:  # outline only: the mask less its erosion
        width = rnd.choice((3, 5, 7))
        mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))), "L")
    return mask


TEXTURES = ("stripes", "checkerboard", "dots", "rings", "waves")


def draw_procedural(kind: str, rnd: random.Random, nrng: np.random.Generator) -> Image.Image:
    """One procedural image of class ``kind`` (a texture name or a shape name)."""
    img, mean = _background(rnd, nrng)
    if kind in TEXTURES:
        mask = Image.fromarray(np.minimum(np.asarray(_texture(kind, rnd)), np.asarray(_region_mask(rnd))), "L")
    else:
        mask = _shape_mask(kind, rnd)
    img.paste(Image.new("RGB", img.size, _contrasting(rnd, [mean])), mask=mask)
    blur = rnd.choice((0.0, 0.0, 0.6, 1.0, 1.5))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    sigma = rnd.uniform(0, 18)
    arr = np.asarray(img, np.float32) + sigma * nrng.standard_normal((SIZE, SIZE, 3), dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class FolderSpec:
    """One benchmark folder: how it is made, from what, and its builder's version (bump it when
    the output changes, so an old build is replaced instead of skipped)."""

    name: str
    description: str
    make: Callable[["BuildContext"], None]
    needs_source: bool
    version: int = 1


@dataclass
class BuildContext:
    """What a builder writes into: ``dir`` (the temporary folder), the source, ``small``, the counts."""

    name: str
    dir: Path
    source: Path | None
    small: int | None
    seed: int = SEED

    def __post_init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def cap(self, n: int) -> int:
        return n if self.small is None else min(n, self.small)

    def write(self, split: str, cls: str, file_name: str, data: bytes) -> None:
        path = self.dir / split / cls / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # inside the temporary folder: the folder's rename is the atomic step
        self.counts.setdefault(split, {}).setdefault(cls, 0)
        self.counts[split][cls] += 1


def source_files(source: Path) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [paths]}}`` of the ants/bees source, read by hymtl's own scanner."""
    layout = resolve_layout(source)
    if layout.train is None or layout.val is None:
        raise DataError(f"--source {source} has no train/ and val/ folders (expected hymenoptera_data)")
    out = {}
    for split, folder in (("train", layout.train), ("val", layout.val)):
        classes = find_classes(folder)
        samples = scan_split(folder, classes)
        out[split] = {c: [s.path for s in samples if s.label == i] for i, c in enumerate(classes)}
    return out


def source_fingerprint(source: Path) -> dict:
    """Files and a SHA-256 over (split/class/name, size) of the source: which photos a build used,
    independent of where the source folder lies."""
    digest, n = hashlib.sha256(), 0
    for split, classes in source_files(source).items():
        for cls, paths in classes.items():
            for path in paths:
                digest.update(f"{split}/{cls}/{os.path.basename(path)}\0{os.path.getsize(path)}\n".encode())
                n += 1
    return {"files": n, "sha256": digest.hexdigest()}


def _photo(path: str) -> Image.Image:
    """A source photo, EXIF-upright RGB, its short side resized to ``SOURCE_SHORT``."""
    img = load_rgb(path, min_size=SOURCE_SHORT)
    scale = SOURCE_SHORT / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def _line_drawing(img: Image.Image) -> Image.Image:
    """Grayscale line drawing: smoothed luminance, edge map, contrast-stretched, inverted (dark
    lines on white), pushed towards white so faint edges vanish; 3 channels."""
    edges = img.convert("L").filter(ImageFilter.GaussianBlur(1.2)).filter(ImageFilter.FIND_EDGES)
    edges = ImageOps.autocontrast(edges, cutoff=1)
    lines = ImageOps.invert(edges).point(lambda v: 255 - min(255, int((255 - v) * 1.4)))
    return lines.convert("RGB")


def make_gray_lines(ctx: BuildContext) -> None:
    for split, classes in source_files(ctx.source).items():
        for cls, paths in classes.items():
            for path in paths[:ctx.cap(len(paths))]:
                ctx.write(split, cls, Path(path).stem + ".jpg", jpeg_bytes(_line_drawing(_photo(path))))


def make_crops(ctx: BuildContext) -> None:
    for split, classes in source_files(ctx.source).items():
        for cls, paths in classes.items():
            for path in paths[:ctx.cap(len(paths))]:
                rnd, _ = rng_for(ctx.seed, ctx.name, split, cls, os.path.basename(path))
                img = _photo(path)
                area = rnd.uniform(0.25, 0.40) * img.width * img.height
                aspect = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
                w = min(img.width, round(math.sqrt(area * aspect)))
                h = min(img.height, round(math.sqrt(area / aspect)))
                x, y = rnd.randint(0, img.width - w), rnd.randint(0, img.height - h)
                crop = img.crop((x, y, x + w, y + h))
                scale = SOURCE_SHORT / min(crop.size)
                crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
                ctx.write(split, cls, Path(path).stem + ".jpg", jpeg_bytes(crop))


def make_imbalanced(ctx: BuildContext) -> None:
    files = source_files(ctx.source)
    train, val = files["train"], files["val"]
    majority = ctx.cap(len(train["ants"]))
    keep = {"ants": train["ants"][:majority],
            "bees": sorted(random.Random(f"{ctx.seed}:{ctx.name}:train").sample(
                train["bees"], max(1, round(majority / IMBALANCE))))}
    balanced = ctx.cap(min(len(paths) for paths in val.values()))
    for cls, paths in val.items():
        keep_val = sorted(random.Random(f"{ctx.seed}:{ctx.name}:val:{cls}").sample(paths, balanced))
        for path in keep_val:
            ctx.write("val", cls, os.path.basename(path), Path(path).read_bytes())
    for cls, paths in keep.items():
        for path in paths:
            ctx.write("train", cls, os.path.basename(path), Path(path).read_bytes())


def procedural_maker(classes: Sequence[str], n_train: int, n_val: int) -> Callable[[BuildContext], None]:
    """A builder drawing ``n_train`` + ``n_val`` images of each of ``classes`` (texture/shape names)."""

    def make(ctx: BuildContext) -> None:
        for split, n in (("train", n_train), ("val", n_val)):
            for cls in classes:
                for i in range(ctx.cap(n)):
                    rnd, nrng = rng_for(ctx.seed, ctx.name, split, cls, i)
                    ctx.write(split, cls, f"{cls}_{i:04d}.jpg", jpeg_bytes(draw_procedural(cls, rnd, nrng)))

    return make


def make_digits(ctx: BuildContext) -> None:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    by_class: dict[int, list[int]] = {}
    for i, target in enumerate(digits.target):
        by_class.setdefault(int(target), []).append(i)
    for cls, indices in sorted(by_class.items()):
        order = sorted(indices, key=lambda i: hashlib.sha256(f"{ctx.seed}:{i}".encode()).hexdigest())
        for split, chosen in (("train", order[:120]), ("val", order[120:170])):
            for i in chosen[: ctx.cap(len(chosen))]:
                rnd, _ = rng_for(ctx.seed, ctx.name, i)
                pixels = (digits.images[i] * (255.0 / 16)).astype(np.uint8)
                size = rnd.randint(72, 104)
                glyph = Image.fromarray(255 - pixels, "L").resize((size, size), Image.BICUBIC)
                glyph = glyph.rotate(rnd.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=255)
                canvas = Image.new("L", (112, 112), 255)
                canvas.paste(glyph, (rnd.randint(0, 112 - size), rnd.randint(0, 112 - size)))
                ctx.write(split, str(cls), f"digit_{i:04d}.jpg", jpeg_bytes(canvas))


TEN_CLASSES = TEXTURES + ("polygon3", "polygon4", "polygon5", "polygon6", "polygon7")
MANY_CLASSES = (TEXTURES + tuple(f"polygon{n}" for n in range(3, 9)) + tuple(f"star{n}" for n in range(4, 9))
                + ("circle", "ellipse", "cross", "crescent", "semicircle", "arrow", "L", "T"))

FOLDERS: dict[str, FolderSpec] = {spec.name: spec for spec in (
    FolderSpec("gray_lines", "ants/bees as grayscale line drawings: each photo's short side resized to "
               f"{SOURCE_SHORT} px, Gaussian blur 1.2, FIND_EDGES, autocontrast (1% cutoff), inverted (dark "
               "lines on white), faint edges pushed to white, saved as 3-channel JPEG. Same photos and "
               "counts as the source.", make_gray_lines, needs_source=True),
    FolderSpec("crops", "ants/bees as heavy crops: one random crop per photo (25-40% of its area, aspect "
               f"3/4-4/3, uniform position; a crop may miss the insect), upscaled to a {SOURCE_SHORT} px "
               "short side. Same photos and counts as the source.", make_crops, needs_source=True),
    FolderSpec("imbalanced", f"ants/bees with class imbalance: train keeps every ant and a seeded sample of "
               f"bees, 1 bee per {IMBALANCE} ants; val is balanced (a seeded sample of each class, as many "
               "as the smaller one has). Files copied byte for byte.", make_imbalanced, needs_source=True),
    FolderSpec("ten_class_3k", "10 procedural classes, 300 train + 60 val each, 224x224 JPEG: five textures "
               "shown inside a random ellipse/rectangle region (stripes, checkerboard, dots, rings, waves; "
               "random period, rotation, colour) and five jittered polygons by number of sides (3-7; radius "
               "28-82 px, random rotation, position and colour; filled or outline), over a two-colour "
               "gradient with small clutter (lines, dots), random blur (0-1.5) and pixel noise (sigma 0-18).",
               procedural_maker(TEN_CLASSES, 300, 60), needs_source=False),
    FolderSpec("many_classes", f"{len(MANY_CLASSES)} procedural classes with few images, 20 train + 10 val "
               "each, drawn as ten_class_3k: the five textures, polygons with 3-8 sides, stars with 4-8 "
               "points, circle, ellipse, cross, crescent, semicircle, arrow, L and T shapes.",
               procedural_maker(MANY_CLASSES, 20, 10), needs_source=False),
    FolderSpec("digits", "scikit-learn's bundled 8x8 handwritten digits (16 gray levels), 10 classes, 120 "
               "train + 50 val each (a seeded order of each class's images): inverted to dark strokes on "
               "white, scaled to 72-104 px (bicubic), rotated up to 15 degrees, pasted at a random place "
               "on a 112 px white canvas, saved as grayscale JPEG.", make_digits, needs_source=False),
)}


# --------------------------------------------------------------------------- atomic builds
def build_params(spec: FolderSpec, small: int | None, source: Path | None) -> dict:
    """What identifies a build (the content of ``.build.json``): a folder built with other params is rebuilt."""
    return {"folder": spec.name, "version": spec.version, "seed": SEED, "small": small,
            "jpeg_quality": JPEG_QUALITY, "source": source_fingerprint(source) if spec.needs_source else None}


def is_complete(path: Path, params: dict) -> bool:
    """``path`` is a finished build with these ``params`` (its ``.build.json``, written last, matches)."""
    try:
        return json.loads((path / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path, name: str) -> None:
    """Remove ``.<name>.partial-<pid>-*`` folders whose process is gone (an interrupted build)."""
    for entry in out.glob(f".{name}.partial-*"):
        try:
            pid = int(entry.name.split(".partial-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _readme(spec: FolderSpec, ctx: BuildContext, params: dict) -> str:
    lines = [f"{spec.name}: a hymtl benchmark folder, made by benchmarks/folders.py (not real data to publish).",
             "", spec.description, "",
             f"seed: {SEED}   builder version: {spec.version}   JPEG quality: {JPEG_QUALITY}"
             + (f"   --small {ctx.small} (capped: not the benchmark)" if ctx.small is not None else "")]
    if params["source"] is not None:
        lines.append(f"source: hymenoptera_data (ants/bees; {params['source']['files']} files, "
                     f"sha256 of names+sizes {params['source']['sha256'][:16]}...)")
    else:
        lines.append("source: none (procedural, PIL ImageDraw)")
    lines += ["", "images per class:"]
    for split in ("train", "val"):
        counts = ctx.counts.get(split, {})
        lines.append(f"  {split} ({sum(counts.values())}): "
                     + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
    lines += ["", "rebuild: python benchmarks/folders.py --out DIR --only " + spec.name
              + (f" --small {ctx.small}" if ctx.small is not None else ""), ""]
    return "\n".join(lines)


def build_folder(name: str, out: str | os.PathLike = DEFAULT_OUT, source: str | os.PathLike | None = DEFAULT_SOURCE,
                 small: int | None = None) -> tuple[Path, bool]:
    """Build folder ``name`` as ``out/name`` unless a complete build with the same params is there.

    Returns ``(path, built)``: ``built`` is False when an existing build was kept. Built into a
    hidden temporary folder in ``out`` and renamed into place, ``.build.json`` last; an existing
    folder of another build (other ``small``, version, source) is replaced only after the new one
    is complete. A folder at ``out/name`` without ``.build.json`` is not ours: :class:`DataError`."""
    spec = FOLDERS.get(name)
    if spec is None:
        raise DataError(f"unknown benchmark folder '{name}' (known: {', '.join(FOLDERS)})")
    if small is not None and small < 1:
        raise DataError(f"--small must be at least 1, got {small}")
    src = Path(source).expanduser() if source is not None else None
    if spec.needs_source and (src is None or not (src / "train").is_dir()):
        raise DataError(f"'{name}' is made from the ants/bees photos: --source {src} has no train/ folder")
    out = Path(out).expanduser()
    target = out / name
    params = build_params(spec, small, src if spec.needs_source else None)
    if is_complete(target, params):
        return target, False
    if target.exists() and not (target / MARKER).exists():
        raise DataError(f"{target} exists and was not built by benchmarks/folders.py: remove it or choose "
                        f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=out))
    try:
        ctx = BuildContext(name, tmp, src if spec.needs_source else None, small)
        spec.make(ctx)
        (tmp / "README.txt").write_text(_readme(spec, ctx, params))
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if target.exists():  # an older build with other params: swap, then drop it
            old = out / f".{name}.partial-{os.getpid()}-old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, True


def folder_counts(path: str | os.PathLike) -> dict:
    """Classes and per-split image counts of a built folder, as hymtl's own scanner reads them."""
    layout = resolve_layout(path)
    classes = find_classes(layout.train)
    row = {"classes": classes}
    for split, folder in (("train", layout.train), ("val", layout.val)):
        samples = scan_split(folder, classes)
        per_class = [sum(1 for s in samples if s.label == i) for i in range(len(classes))]
        row[split] = {"images": len(samples), "min": min(per_class), "max": max(per_class)}
    return row


def build_all(names: Sequence[str] | None = None, out: str | os.PathLike = DEFAULT_OUT,
              source: str | os.PathLike | None = DEFAULT_SOURCE, small: int | None = None) -> list[dict]:
    """Build (or keep) each folder of ``names`` (default: all); one row of counts per folder."""
    rows = []
    for name in names or list(FOLDERS):
        path, built = build_folder(name, out, source, small)
        rows.append({"folder": name, "path": str(path), "built": built, **folder_counts(path)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The summary table (markdown): folder, classes, images and min/max per class per split."""
    lines = ["| folder | classes | train images | val images | train min/max per class | "
             "val min/max per class | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {len(r['classes'])} | {r['train']['images']} | {r['val']['images']} | "
                     f"{r['train']['min']}/{r['train']['max']} | {r['val']['min']}/{r['val']['max']} | "
                     f"{'built' if r['built'] else 'kept'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the folders go (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=list(FOLDERS), metavar="NAME",
                        help=f"build only these ({', '.join(FOLDERS)})")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help="the ants/bees folder (train/, val/) the derived folders are made from")
    parser.add_argument("--small", type=int, default=None, metavar="N",
                        help="at most N images per class and split (tests, smoke runs)")
    args = parser.parse_args(argv)
    try:
        rows = build_all(args.only, args.out, args.source, args.small)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"folders in {Path(args.out).expanduser()}:")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

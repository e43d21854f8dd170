"""A dirty image folder made by code: every kind of bad or odd file users' folders hold.

``make_bad_corpus(root)`` writes ``root/{train,val}/<class>/…`` and returns, for each file of
the training split, what the DataModule must do with it:

* ``OK``: usable (loaded as RGB of the listed size, after EXIF rotation);
* ``RUNTIME``: passes the cheap up-front check (header fine) and fails to decode during
  training: dropped from its batch and appended to skipped.txt;
* a reason prefix: left out by the up-front check with that reason.

Nothing here is stored in the repository: the files are generated per test run (small: the
decompression bomb is a 100-megapixel PNG that compresses to ~100 KB).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

OK = "ok"
RUNTIME = "cannot decode: "  # + Pillow's message, suffixed "(during training)"


@dataclass(frozen=True)
class Case:
    """One corpus file: its path relative to the root, the expected verdict, the RGB size if OK."""

    rel: str
    expect: str
    size: tuple[int, int] | None = None
    what: str = ""


def _noise_rgb(size: tuple[int, int], color=(180, 60, 40), seed: int = 0) -> Image.Image:
    img = Image.new("RGB", size, color)
    # a deterministic pattern so that JPEGs are not trivially small
    px = img.load()
    for y in range(0, size[1], 3):
        for x in range(0, size[0], 3):
            px[x, y] = ((x * 7 + seed) % 256, (y * 5) % 256, (x + y) % 256)
    return img


def _jpeg_bytes(size=(96, 80), **kw) -> bytes:
    buf = io.BytesIO()
    _noise_rgb(size).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def write_truncated_jpeg(path: Path) -> Path:
    """The first half of a 96x80 JPEG: the header parses, the pixels do not decode."""
    data = _jpeg_bytes((96, 80))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_decompression_bomb(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid grayscale PNG of ``width x height`` (all black) written without ever holding the
    pixels in memory: over Pillow's default limit (89.5 megapixels) at the default size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width  # filter byte + one row of pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", idat))
        f.write(chunk(b"IEND", b""))
    return path


def make_bad_corpus(root: Path) -> list[Case]:
    """Write the corpus below ``root`` and return the training split's cases."""
    train, val = root / "train", root / "val"
    ants, bees = train / "ants", train / "bees"
    cases: list[Case] = []

    def add(rel: str, expect: str, size=None, what: str = "") -> Path:
        cases.append(Case(rel, expect, size, what))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- usable, if odd -------------------------------------------------------------------
    _noise_rgb((64, 48)).save(add("train/ants/plain.jpg", OK, (64, 48), "plain JPEG"), "JPEG")
    _noise_rgb((50, 40)).save(add("train/ants/png_named.jpg", OK, (50, 40), "PNG named .jpg"), "PNG")
    _noise_rgb((40, 30)).convert("CMYK").save(add("train/ants/cmyk.jpg", OK, (40, 30), "CMYK JPEG"), "JPEG")
    _noise_rgb((40, 30)).convert("L").save(add("train/ants/gray.jpg", OK, (40, 30), "grayscale JPEG"), "JPEG")
    Image.new("I;16", (40, 30), 40000).save(add("train/ants/deep16.png", OK, (40, 30), "16-bit PNG"), "PNG")
    rgba = _noise_rgb((40, 30)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(add("train/ants/rgba.png", OK, (40, 30), "RGBA PNG"), "PNG")
    _noise_rgb((40, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        add("train/ants/palette.gif", OK, (40, 30), "palette GIF"), "GIF")
    frames = [_noise_rgb((40, 30), color=(i * 60, 0, 0), seed=i).convert("P") for i in range(3)]
    frames[0].save(add("train/ants/animated.gif", OK, (40, 30), "animated GIF (first frame)"), "GIF",
                   save_all=True, append_images=frames[1:], duration=100, loop=0)
    _noise_rgb((40, 30)).save(add("train/ants/photo.webp", OK, (40, 30), "WebP"), "WEBP")
    pages = [_noise_rgb((40, 30), seed=i) for i in range(3)]
    pages[0].save(add("train/ants/pages.tiff", OK, (40, 30), "multi-page TIFF (first page)"), "TIFF",
                  save_all=True, append_images=pages[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _noise_rgb((60, 30)).save(add("train/ants/exif_rotated.jpg", OK, (30, 60), "EXIF orientation 6"), "JPEG",
                             exif=exif.tobytes())
    _noise_rgb((1, 1)).save(add("train/ants/one_pixel.png", OK, (1, 1), "1x1 pixel"), "PNG")
    _noise_rgb((10_000, 10)).save(add("train/ants/strip.png", OK, (10_000, 10), "10000x10 strip"), "PNG")
    _noise_rgb((48, 40)).save(add("train/ants/with space ünïcødé 蜂.jpg", OK, (48, 40), "spaces + unicode name"),
                              "JPEG")
    _noise_rgb((48, 40)).save(add("train/ants/nested/deeper/inner.jpg", OK, (48, 40), "nested folders"), "JPEG")
    target = add("train/ants/good_link.jpg", OK, (64, 48), "symlink to a good image")
    os.symlink(root / "train/ants/plain.jpg", target)

    # -- bad: caught by the up-front check ------------------------------------------------
    add("train/ants/empty.jpg", "empty file (0 bytes)", what="zero-byte file").touch()
    add("train/ants/notes.jpg", "not an image: format not recognised", what="text file named .jpg").write_text(
        "<html>404 not found</html>\n")
    write_decompression_bomb(add("train/ants/bomb.png", "decompression bomb refused: 10000x10000 = 100,000,000 pixels",
                                 what="decompression bomb (100 MP PNG)"))
    unreadable = add("train/ants/unreadable.jpg", "unreadable: permission denied", what="no read permission")
    _noise_rgb((40, 30)).save(unreadable, "JPEG")
    os.chmod(unreadable, 0)
    os.symlink(root / "train/ants/missing.jpg", add("train/ants/broken_link.jpg", "broken symlink",
                                                     what="broken symlink"))
    os.symlink("loop_b.jpg", add("train/ants/loop_a.jpg", "symlink loop", what="symlink loop"))
    os.symlink("loop_a.jpg", add("train/ants/loop_b.jpg", "symlink loop", what="symlink loop"))

    # -- bad: passes the header check, fails to decode while training ---------------------
    write_truncated_jpeg(add("train/ants/truncated.jpg", RUNTIME, what="truncated JPEG"))

    # -- the other classes ------------------------------------------------------------------
    for i in range(4):
        _noise_rgb((48, 40), color=(40, 40, 200), seed=i).save(add(f"train/bees/bee_{i}.jpg", OK, (48, 40)), "JPEG")
    (train / "empty_class").mkdir(parents=True)  # no files at all: class ignored
    add("train/all_bad/zero.jpg", "empty file (0 bytes)", what="class whose files are all bad").touch()
    add("train/all_bad/text.png", "not an image: format not recognised",
        what="class whose files are all bad").write_text("not a png")
    for name, color in (("ants", (180, 60, 40)), ("bees", (40, 40, 200))):
        (val / name).mkdir(parents=True)
        for i in range(2):
            _noise_rgb((48, 40), color=color, seed=10 + i).save(val / name / f"v{i}.jpg", "JPEG")
    assert ants.is_dir() and bees.is_dir()
    return cases


CLASS_FOLDER_REASON = "class folder without a usable image: class ignored"
IGNORED_CLASSES = ("all_bad", "empty_class")

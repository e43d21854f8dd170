"""Data rules on tiny images made here: scanning, layouts, splits, RGB/EXIF, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_image, make_image_folder
from hymtl.backbones import Preprocessing
from hymtl.data import (
    ImageFolderDataModule,
    download_and_extract,
    load_rgb,
    scan_split,
    stratified_split,
)
from hymtl.errors import DataError, DownloadError

SMALL = Preprocessing(input_size=32, resize_size=36)


def _dm(root, **kw) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, preprocessing=SMALL, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_scan_rules_extensions_case_hidden_and_nested(tmp_path):
    cls = tmp_path / "train" / "ants"
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.bmp", "e.gif", "f.webp", "g.TIF", "h.tiff"):
        make_image(cls / name, (10, 200, 10), fmt={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP",
                   "gif": "GIF", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}[name.rsplit(".", 1)[1].lower()])
    make_image(cls / "nested" / "deeper" / "i.jpg", (1, 2, 3))
    make_image(cls / ".hidden.jpg", (1, 2, 3), fmt="JPEG")
    make_image(cls / ".ipynb_checkpoints" / "j.jpg", (1, 2, 3))
    (cls / ".DS_Store").write_bytes(b"\0\0")
    (cls / "notes.txt").write_text("not an image")
    samples = scan_split(tmp_path / "train", ["ants"])
    names = sorted(Path(s.path).name for s in samples)
    assert names == ["a.JPG", "b.jpeg", "c.Png", "d.bmp", "e.gif", "f.webp", "g.TIF", "h.tiff", "i.jpg"]


def test_class_order_is_sorted_folder_names_and_hidden_folders_ignored(tmp_path):
    root = make_image_folder(tmp_path / "d", classes={"zebra": (1, 1, 1), "Apple": (9, 9, 9), "mango": (5, 5, 5)},
                             per_class=2)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    dm = _dm(root)
    assert dm.class_names == ["Apple", "mango", "zebra"]
    assert {s.label for s in dm.train_samples} == {0, 1, 2}


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_val_folder_aliases_and_val_doubles_as_test(tmp_path, val_name):
    root = make_image_folder(tmp_path / "d", splits=("train", val_name), per_class=3)
    dm = _dm(root)
    assert len(dm.train_samples) == 6 and len(dm.val_samples) == 6
    assert dm.test_split_name == "val" and dm.test_samples == dm.val_samples


def test_test_folder_is_the_test_split(tmp_path):
    root = make_image_folder(tmp_path / "d", splits=("train", "val", "test"), per_class=2)
    (root / "test" / "bees" / "bees_1.jpg").unlink()
    dm = _dm(root)
    assert dm.test_split_name == "test"
    assert len(dm.test_samples) == 3 and all("/test/" in s.path for s in dm.test_samples)


def test_flat_class_folders_split_deterministic_and_stratified(tmp_path):
    root = tmp_path / "flat"
    for name, color in {"cats": (1, 2, 3), "dogs": (3, 2, 1)}.items():
        for i in range(10):
            make_image(root / name / f"{i}.png", color, fmt="PNG")
    a = _dm(root, val_fraction=0.3, seed=1)
    b = _dm(root, val_fraction=0.3, seed=1)
    c = _dm(root, val_fraction=0.3, seed=2)
    assert a.class_names == ["cats", "dogs"]
    assert [s.path for s in a.val_samples] == [s.path for s in b.val_samples]
    assert [s.path for s in a.val_samples] != [s.path for s in c.val_samples]
    assert sorted(s.label for s in a.val_samples) == [0, 0, 0, 1, 1, 1]
    assert not {s.path for s in a.val_samples} & {s.path for s in a.train_samples}
    assert len(a.train_samples) + len(a.val_samples) == 20


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(DataError):
        stratified_split([], 1.5, 0)


def test_fewer_than_two_classes_and_missing_root_are_data_errors(tmp_path):
    make_image(tmp_path / "one" / "train" / "only" / "a.jpg", (1, 1, 1))
    with pytest.raises(DataError, match="two class"):
        _ = ImageFolderDataModule(root=str(tmp_path / "one")).class_names
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).prepare_data()


def test_palette_gif_and_rgba_and_grayscale_become_rgb(tmp_path):
    gif = tmp_path / "imageNotFound.gif"
    Image.new("P", (30, 30), 3).save(gif)  # like train/ants/imageNotFound.gif
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(rgba)
    gray = tmp_path / "g.png"
    Image.new("L", (8, 8), 77).save(gray)
    for path in (gif, rgba, gray):
        assert load_rgb(path).mode == "RGB"
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert load_rgb(gray).getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_batches_have_backbone_size_and_normalisation(tiny_folder):
    dm = _dm(tiny_folder)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)
    # normalised with ImageNet mean/std: red class has a high R channel, low B channel
    assert val_images[:, 0].mean() > 1.0 and val_images[:, 2].mean() < -0.5


# ----------------------------------------------------------------------------- download
def _zip_folder(src: Path, zip_path: Path, top: str, extra: dict[str, bytes] | None = None) -> bytes:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f"{top}/{f.relative_to(src)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return zip_path.read_bytes()


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on localhost serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _manifest(folder: Path, out: Path) -> Path:
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(folder)}"
             for f in sorted(folder.rglob("*")) if f.is_file()]
    out.write_text("\n".join(lines) + "\n")
    return out


def test_download_checks_sha256_and_manifest_and_extracts_atomically(tmp_path, http_root):
    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=2)
    data = _zip_folder(src, www / "hymenoptera_data.zip", "hymenoptera_data")
    manifest = _manifest(src, tmp_path / "m.sha256")
    root = tmp_path / "data" / "hymenoptera_data"
    dm = ImageFolderDataModule(root=str(root), download_url=f"{url}/hymenoptera_data.zip",
                               sha256=hashlib.sha256(data).hexdigest(), manifest=str(manifest),
                               preprocessing=SMALL, num_workers=0)
    dm.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    assert dm.class_names == ["ants", "bees"]
    assert [p.name for p in root.parent.iterdir()] == ["hymenoptera_data"]  # no temp leftovers


def test_download_rejects_checksum_mismatch_and_leaves_nothing(tmp_path, http_root):
    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=1)
    _zip_folder(src, www / "d.zip", "d")
    root = tmp_path / "data" / "d"
    with pytest.raises(DownloadError, match="checksum"):
        download_and_extract(f"{url}/d.zip", root, sha256="0" * 64)
    assert not root.exists() and list(root.parent.iterdir()) == []


def test_download_rejects_manifest_mismatch(tmp_path, http_root):
    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=1)
    manifest = _manifest(src, tmp_path / "m.sha256")
    (src / "train" / "ants" / "ants_0.jpg").write_bytes(b"tampered")
    _zip_folder(src, www / "d.zip", "d")
    with pytest.raises(DownloadError, match="checksum mismatch for train/ants/ants_0.jpg"):
        download_and_extract(f"{url}/d.zip", tmp_path / "out" / "d", manifest=manifest)


def test_download_refuses_zip_slip(tmp_path, http_root):
    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=1)
    _zip_folder(src, www / "evil.zip", "d", extra={"../../escaped.txt": b"x"})
    with pytest.raises(DownloadError, match="unsafe"):
        download_and_extract(f"{url}/evil.zip", tmp_path / "out" / "d")
    assert not (tmp_path / "escaped.txt").exists()


def test_download_failure_is_one_clear_error(tmp_path, http_root):
    _, url = http_root
    with pytest.raises(DownloadError, match="could not download"):
        download_and_extract(f"{url}/missing.zip", tmp_path / "out" / "d")


def test_local_copy_touches_no_network(tiny_folder, monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("network touched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dm = ImageFolderDataModule(root=str(tiny_folder), download_url="http://example.invalid/x.zip",
                               preprocessing=SMALL, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_samples) == 12


def test_shipped_manifest_matches_real_data(real_data):
    from hymtl.data import MANIFEST_DIR, verify_manifest

    verify_manifest(real_data, MANIFEST_DIR / "hymenoptera_data.sha256")


def test_real_data_counts_and_quirk(real_data):
    dm = ImageFolderDataModule(root=str(real_data), preprocessing=SMALL, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["ants", "bees"]
    # 245 train files: ImageFolder's 244 plus the placeholder GIF, which we read as RGB
    assert (len(dm.train_samples), len(dm.val_samples)) == (245, 153)
    gif = next(s for s in dm.train_samples if s.path.endswith("imageNotFound.gif"))
    assert load_rgb(gif.path).mode == "RGB"


# --------------------------------------------------------------------------- progress (not a terminal)
def test_file_check_ends_with_one_summary_line_and_no_bar_off_a_terminal(tmp_path, caplog, capsys):
    import re

    root = make_image_folder(tmp_path / "data", per_class=3)
    (root / "train" / "ants" / "empty.jpg").write_bytes(b"")
    with caplog.at_level("INFO", logger="hymtl"):
        _dm(root)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("file check:")]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"file check: 13 files in \d+\.\ds \(\d+\.\d files/s, bad 1\)", lines[0]), lines[0]
    captured = capsys.readouterr()
    assert "file check" not in captured.out + captured.err  # stdout is no terminal here: no bar


def test_download_ends_with_byte_and_rate_summary_lines(tmp_path, http_root, caplog, capsys):
    import os
    import re

    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=1)
    data = _zip_folder(src, www / "d.zip", "d", extra={"d/noise.bin": os.urandom(3 * 2**19)})  # ~1.5 MB
    with caplog.at_level("INFO", logger="hymtl"):
        download_and_extract(f"{url}/d.zip", tmp_path / "out" / "d")
    messages = [r.getMessage() for r in caplog.records]
    download = [m for m in messages if m.startswith("download:")]
    assert len(download) == 1 and re.fullmatch(
        rf"download: {len(data) / 2**20:.1f} MB in \d+\.\ds \(\d+\.\d MB/s\)", download[0]), download
    extract = [m for m in messages if m.startswith("extract:")]
    assert len(extract) == 1 and re.fullmatch(r"extract: 5 files in \d+\.\ds \(\d+\.\d files/s\)", extract[0]), extract
    captured = capsys.readouterr()
    assert "download" not in captured.out + captured.err


def test_zip_names_from_other_systems_extract_or_fail_as_one_line(tmp_path, http_root):
    """Names without zip's UTF-8 flag (old Windows/DOS tools) are read as cp437 and work; a name
    flagged UTF-8 that is not UTF-8 is one DownloadError line, not a UnicodeDecodeError."""
    import io

    www, url = http_root
    src = make_image_folder(tmp_path / "src", per_class=2)
    image = (src / "train" / "ants" / "ants_0.jpg").read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in sorted(src.rglob("*.jpg")):
            zf.write(f, f"d/{f.relative_to(src)}")
        zf.writestr("d/train/ants/cafXY.jpg", image)  # ASCII: no UTF-8 flag; the bytes are patched below
        zf.writestr("d/train/bees/caf\u00e9.jpg", image)  # non-ASCII: flagged UTF-8
    data = buffer.getvalue()
    (www / "cp437.zip").write_bytes(data.replace(b"cafXY", b"caf\x82\xe9").replace("caf\u00e9".encode(), b"caf\xc3A"))
    with pytest.raises(DownloadError) as info:
        download_and_extract(f"{url}/cp437.zip", tmp_path / "out" / "d")
    assert "marked as UTF-8 but is not valid UTF-8" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "d").exists()
    (www / "cp437_only.zip").write_bytes(data.replace(b"cafXY", b"caf\x82\xe9"))
    root = download_and_extract(f"{url}/cp437_only.zip", tmp_path / "out2" / "d")
    assert (root / "train" / "ants" / "caf\u00e9\u0398.jpg").is_file()  # cp437: 0x82 é, 0xe9 Θ
    dm = _dm(root)
    assert str(root / "train" / "ants" / "caf\u00e9\u0398.jpg") in {s.path for s in dm.train_samples}


def test_a_bad_image_is_recorded_once_when_loaders_are_rebuilt_every_epoch(tmp_path):
    # two_phase rebuilds its loaders every epoch: every rebuild is a fresh dataset (and fresh workers)
    from hymtl.data.folders import Sample
    from hymtl.data.images import ImageSampleDataset, read_skipped

    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(make_image(tmp_path / "whole.jpg", (10, 200, 10), size=(64, 64)).read_bytes()[:300])
    log_file = tmp_path / "skipped.txt"
    for _epoch in range(3):
        dataset = ImageSampleDataset([Sample(str(truncated), 0)], transform=lambda image: image, skip_bad=True,
                                     failure_log=log_file)
        assert dataset[0] is None
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and len(read_skipped(log_file)) == 1, lines

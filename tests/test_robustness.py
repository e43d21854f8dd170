"""Dirty real-world folders never crash a run: the generated bad-file corpus (tests/bad_corpus.py),
strict mode, decode failures inside DataLoader workers, fatal input as one line + exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from bad_corpus import (
    CLASS_FOLDER_REASON,
    IGNORED_CLASSES,
    OK,
    RUNTIME,
    make_bad_corpus,
    write_decompression_bomb,
    write_truncated_jpeg,
)
from conftest import REPO_ROOT, entry_command, make_image, make_image_folder
from hymtl.backbones import Preprocessing
from hymtl.data import (
    RUNTIME_SUFFIX,
    ImageFolderDataModule,
    ImageSampleDataset,
    SkippingDataLoader,
    check_image_file,
    collate_skipping,
    load_rgb,
    read_skipped,
)
from hymtl.errors import DataError

SMALL = Preprocessing(input_size=32, resize_size=36)
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "dirty"
    return root, make_bad_corpus(root)


def _dm(root: Path, tmp_path: Path, **kw) -> ImageFolderDataModule:
    kw = {"batch_size": 4, "num_workers": 0, **kw}
    return ImageFolderDataModule(root=str(root), preprocessing=SMALL, skipped_file=tmp_path / "skipped.txt", **kw)


def test_every_corpus_file_is_loaded_or_skipped_with_its_reason(corpus, tmp_path):
    root, cases = corpus
    dm = _dm(root, tmp_path, num_workers=2)  # decode failures must be caught inside the workers too
    dm.setup("fit")
    assert dm.class_names == ["ants", "bees"]  # the empty and the all-bad class folders are ignored
    train_paths = {s.path for s in dm.train_samples}
    skipped_upfront = {b.path: b.reason for b in dm.skipped}
    for case in cases:
        path = str(root / case.rel)
        if case.expect == OK:
            assert path in train_paths, case
            image = load_rgb(path)
            assert image.mode == "RGB" and image.size == case.size, (case, image.size)
        elif case.expect == RUNTIME:
            assert path in train_paths, case  # the header is fine: only decoding shows it
        elif case.rel.endswith("unreadable.jpg") and IS_ROOT:
            assert path in train_paths  # root reads anything; see the unprivileged test below
        else:
            assert skipped_upfront.get(path, "").startswith(case.expect), (case, skipped_upfront.get(path))
    for name in IGNORED_CLASSES:
        assert skipped_upfront[str(root / "train" / name)] == CLASS_FOLDER_REASON

    seen = 0
    for images, labels in dm.train_dataloader():
        assert images.shape[1:] == (3, 32, 32) and torch.isfinite(images).all()
        seen += len(labels)
    runtime = [c for c in cases if c.expect == RUNTIME]
    assert seen == len(dm.train_samples) - len(runtime)
    recorded = {b.path: b.reason for b in read_skipped(tmp_path / "skipped.txt")}
    for case in runtime:
        reason = recorded[str(root / case.rel)]
        assert reason.startswith("cannot decode: image file is truncated") and reason.endswith(RUNTIME_SUFFIX)
    for path, reason in skipped_upfront.items():  # the up-front verdicts are in skipped.txt too
        assert recorded[path] == reason


def test_unreadable_file_is_skipped_for_an_unprivileged_user():
    """As root every file is readable, so the check runs in a forked child as ``nobody``."""
    folder = Path(tempfile.mkdtemp(prefix="hymtl-perm-"))
    try:
        os.chmod(folder, 0o755)
        path = make_image(folder / "secret.jpg", (10, 200, 10))
        os.chmod(path, 0)
        if not IS_ROOT:
            assert check_image_file(path) == "unreadable: permission denied"
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges, check, report through the pipe
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(write_end, str(check_image_file(path)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            assert f.read() == "unreadable: permission denied"
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


@pytest.mark.slow  # a fresh interpreter importing hymtl.data (torch): ~5.5 s of CPU measured
def test_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    bomb = write_decompression_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000  # 100 megapixels in ~100 KB: the point of a bomb
    probe = (
        "import resource, sys\n"
        "from hymtl.data import check_image_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(check_image_file(sys.argv[1]))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True, timeout=120).stdout.splitlines()
    assert out[0].startswith("decompression bomb refused: 10000x10000 = 100,000,000 pixels is over Pillow's")
    assert int(out[1]) < 20_000  # KiB of peak memory growth: decoding would need 100 MB


def test_strict_mode_makes_any_bad_file_an_error_before_training(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError) as info:
        _dm(root, tmp_path, strict=True).setup("fit")
    message = str(info.value)
    assert message.startswith("data.strict=true: ") and "\n" not in message and "skipped.txt" in message
    # strict decodes every file up front: a truncated JPEG (fine header) is caught before training
    clean = make_image_folder(tmp_path / "clean", per_class=2)
    truncated = clean / "train" / "ants" / "ants_0.jpg"
    write_truncated_jpeg(truncated)
    lenient = _dm(clean, tmp_path / "lenient")
    lenient.setup("fit")
    assert str(truncated) in {s.path for s in lenient.train_samples}  # lenient: found only when decoded
    with pytest.raises(DataError, match=r"data\.strict=true: 1 file skipped: 1 cannot decode in .*; first: .*ants_0\.jpg"):
        _dm(clean, tmp_path / "strict", strict=True).setup("fit")


def test_an_evaluation_batch_whose_every_file_fails_is_dropped(tmp_path):
    good = make_image(tmp_path / "good.jpg", (200, 30, 30))
    bad = []
    for i in range(3):
        path = make_image(tmp_path / f"bad{i}.jpg", (30, 30, 200), size=(64, 64))
        path.write_bytes(path.read_bytes()[:200])
        bad.append(path)
    from hymtl.data import Sample, build_transforms

    samples = [Sample(str(p), 0) for p in bad] + [Sample(str(good), 1)]
    dataset = ImageSampleDataset(samples, build_transforms(SMALL, train=False), skip_bad=True)
    batches = list(SkippingDataLoader(dataset, batch_size=3, collate_fn=collate_skipping))
    assert len(batches) == 1 and batches[0][1].tolist() == [1]  # the all-bad first batch is gone


# --------------------------------------------------------------------------- entry point
TINY = ["model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.num_workers=0",
        "data.batch_size=4", "callbacks.test_figures=null"]


def _train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command("hymtl.train"), *TINY, *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_on_the_dirty_corpus_trains_and_reports_what_it_skipped(corpus, tmp_path):
    root, cases = corpus
    result = _train(tmp_path, f"data.root={root}", "data.num_workers=2", "mode=finetune", "mode.epochs=1",
                    "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    skipped = read_skipped(run / "skipped.txt")
    expected_bad = sum(c.expect not in (OK,) for c in cases) + len(IGNORED_CLASSES) - IS_ROOT  # unreadable
    assert metrics["skipped_files"] == len(skipped) == expected_bad, [b.reason for b in skipped]
    assert metrics["class_names"] == ["ants", "bees"]
    logs = result.stdout + result.stderr
    assert f"{expected_bad} files skipped: " in logs and "skipped.txt" in logs
    assert any(b.reason.endswith(RUNTIME_SUFFIX) for b in skipped)


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        ("all_bad", [], "error: need at least two classes with usable images in {root}/train, found none"),
        ("one_class", [], "error: need at least two classes with usable images in {root}/train, found only ['ants']"),
        ("clean", ["mode.epochs=-1"], "error: mode.epochs must be a positive integer, got -1"),
        ("clean", ["hydra.run.dir=a_file/run"], "error: cannot write the output folder a_file/run: Not a directory"),
        ("truncated", ["data.strict=true"],
         "error: data.strict=true: 1 file skipped: 1 cannot decode in {root}; first: {root}/train/bees/bees_0.jpg"),
    ],
)
@pytest.mark.slow
def test_fatal_input_is_one_line_and_exit_2(tmp_path, setup, overrides, message):
    root = tmp_path / "data"
    make_image_folder(root, per_class=2)
    if setup in ("all_bad", "one_class"):
        for path in (root / "train").glob("bees/*.jpg" if setup == "one_class" else "*/*.jpg"):
            path.write_bytes(b"")
    if setup == "truncated":
        write_truncated_jpeg(root / "train" / "bees" / "bees_0.jpg")  # header intact: only decoding shows it
    (tmp_path / "a_file").write_text("not a folder")
    result = _train(tmp_path, f"data.root={root}", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(root=root)), last


INVALID_NUMBERS = [
    ("mode.epochs=0", "mode.epochs must be a positive integer, got 0"),
    ("mode.epochs=three", "mode.epochs must be an integer, got 'three'"),
    ("mode.epochs=2.5", "mode.epochs must be an integer, got 2.5"),
    ("trainer.max_epochs=-1", "trainer.max_epochs must be a positive integer, got -1"),
    ("mode.lr=0", "mode.lr must be a positive number, got 0"),
    ("mode.lr=-1e-3", "mode.lr must be a positive number, got -0.001"),
    ("mode.lr=nan", "mode.lr must be a number, got nan"),
    ("model.lr=fast", "model.lr must be a number, got 'fast'"),
    ("mode.head_lr_mult=-1", "mode.head_lr_mult must not be negative, got -1"),
    ("mode.freeze_epochs=-2", "mode.freeze_epochs must not be negative, got -2"),
    ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
    ("data.num_workers=-2", "data.num_workers must be 'auto' or an integer >= 0, got -2"),
]


def test_invalid_numbers_are_refused_before_anything_runs(compose):
    from hymtl.errors import HymtlError
    from hymtl.config import check_numbers

    check_numbers(compose("data=folder", "data.root=/nowhere", "mode=two_phase"))  # the defaults pass
    for override, message in INVALID_NUMBERS:
        cfg = compose("data=folder", "data.root=/nowhere", "mode=two_phase", override)
        with pytest.raises(HymtlError) as info:
            check_numbers(cfg)
        assert str(info.value) == message, override


def test_a_full_disk_says_which_file_and_how_much_room(tmp_path, monkeypatch):
    import errno

    from hymtl.errors import HymtlError
    from hymtl.fileio import atomic_write_bytes

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(HymtlError) as info:
        atomic_write_bytes(target, b"x" * 3_000_000)
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: No space left on device (3.0 MB needed, ")
    assert "MB free on" in message and "\n" not in message
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]  # no temp file left


# A parent killed right after it forks its DataLoader workers: each worker sleeps first (a slow
# start on a busy machine), so the parent is gone before the worker's own watchdog reads its pid.
KILLED_AFTER_FORK = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader
from hymtl.data.loaders import SkippingDataLoader

def slow_start(worker_id):
    time.sleep(2)

loader_class = SkippingDataLoader if sys.argv[1] == "hymtl" else DataLoader
loader = loader_class(torch.arange(8), batch_size=2, num_workers=2, worker_init_fn=slow_start)
iterator = iter(loader)  # forks the workers
print("forked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_after_fork(loader: str, timeout: float):
    """Run :data:`KILLED_AFTER_FORK`; ``None`` when something still held its stdout after
    ``timeout`` seconds (its workers outlived it: then they are killed here)."""
    process = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_FORK, loader], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        return None


@pytest.mark.slow
def test_dataloader_workers_never_outlive_a_killed_parent():
    # the EOF on stdout says no worker holds it: torch's own watchdog would keep them idle for good
    output = _killed_after_fork("hymtl", timeout=300)
    assert output is not None and "forked" in output, output

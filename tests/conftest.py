"""Shared fixtures: tiny generated image folders, the real ants/bees data, Hydra compose."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n N``) the workers share the cores: each worker's torch (and the entry
# points it starts, through the environment) gets its share of the threads instead of one per
# core, whose idle OpenMP threads spin on the cores the other workers need.
try:
    _cores = len(os.sched_getaffinity(0))
except AttributeError:
    _cores = os.cpu_count() or 1
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker more than cores. About a tenth of the suite's time is waiting, not
    computing (a server starting, a DDP rank's collective timeout, a browser), and with one worker
    per core that core sat idle meanwhile; the extra worker computes then."""
    return _cores + 1


# ``--cpu-durations=N``: the CPU seconds of each test, its subprocesses included (tests/cpu_durations.py)
pytest_plugins = ["cpu_durations"]


def pytest_collection_modifyitems(session, config, items):
    """The heaviest files first, the light ones last, where they fill the workers' gaps at the end:
    a longest-first order, which leaves the shortest tail. Under ``--dist loadfile`` a file runs
    whole on one worker, in the order given here (``--no-loadscope-reorder`` in pyproject.toml:
    xdist's default order, most tests first, had started the 4-test real-data file last, and one
    worker ran it alone for minutes while the others sat idle). How heavy, from the marks: the
    files made only of real-data tests (the regimes' accuracy runs), then the files with a
    real-data test (each trains on the 397 images), then by how many ``slow`` tests a file holds;
    within a file, and between files that tie, the collection order."""
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    def whole_file_on_real_data(item) -> bool:
        marks = getattr(item.module, "pytestmark", [])
        return any(mark.name == "realdata" for mark in (marks if isinstance(marks, list) else [marks]))

    slow, real = {}, {}
    for item in items:
        slow[file_of(item)] = slow.get(file_of(item), 0) + (item.get_closest_marker("slow") is not None)
        real[file_of(item)] = real.get(file_of(item), False) or item.get_closest_marker("realdata") is not None
    items.sort(key=lambda item: (not whole_file_on_real_data(item), not real[file_of(item)], -slow[file_of(item)]))


def load_script(path: Path, name: str):
    """Import a script of benchmarks/ (not a package) as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
DEFAULT_REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "hymenoptera_data"

#: A ``hymtl.train`` override for runs that check plumbing (resume, DDP, signals), not accuracy:
#: efficientnet_lite0's own preprocessing (mean, std, interpolation) at 64 px instead of 224, about
#: 12x less backbone work per image. Not for a run whose checkpoint is then used for inference or
#: export: its model keeps the backbone's 224 px preprocessing.
SMALL_VIEWS = ("+data.preprocessing={input_size:64,resize_size:72,mean:[0.5,0.5,0.5],std:[0.5,0.5,0.5],"
               "interpolation:bicubic}")


def cached_rows(cache: Path) -> int:
    """Rows in the feature cache under ``cache``: one per image and extraction setting (read from
    the shards' headers, the way any safetensors reader would)."""
    import json

    from safetensors import safe_open

    total = 0
    for shard in sorted(cache.rglob("*.safetensors")) if cache.exists() else []:
        with safe_open(str(shard), framework="pt") as f:
            total += len(json.loads(f.metadata()["hymtl-store"])["rows"])
    return total


def make_image(path: Path, color: tuple[int, int, int], size=(48, 40), fmt: str | None = None, seed: int = 0) -> Path:
    """A small noisy image dominated by ``color`` (classes are told apart by colour)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, color)
    pixels = img.load()
    for _ in range(size[0] * size[1] // 4):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-60, 60))) for c in color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


CLASS_COLORS = {"ants": (200, 40, 40), "bees": (40, 40, 200)}


def make_image_folder(root: Path, splits=("train", "val"), per_class: int = 6, classes=CLASS_COLORS) -> Path:
    for split in splits:
        for name, color in classes.items():
            for i in range(per_class):
                make_image(root / split / name / f"{name}_{i}.jpg", color, seed=hash((split, name, i)) % 10_000)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """``train/`` and ``val/`` with two colour classes, 6 JPEGs each."""
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session", autouse=True)
def session_feature_cache(tmp_path_factory):
    """One feature cache for the whole session, in its temporary folder, never the user's
    ``~/.cache/hymtl``: a test must not read what an earlier session left there (its cost and
    its cache hits would depend on it: a warm cache on the developer's machine, a cold one in
    CI), nor leave its tiny images' features there. Tests that need a cache of their own (empty,
    or to count its rows) still set ``HYMTL_CACHE_DIR`` or ``feature_cache.dir`` themselves."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HYMTL_CACHE_DIR", str(tmp_path_factory.mktemp("feature_cache")))
    yield
    patch.undo()


TESTS_DIR = Path(__file__).resolve().parent


def entry_command(module: str) -> list[str]:
    """The command that runs ``python -m <module>`` for a test: through ``tests/launch_entry.py``,
    which hands the run to this worker's fork server (:func:`fork_server`) when it runs, saving
    the ~6 s of CPU each entry point spends importing torch and Lightning, and otherwise becomes
    ``python -m <module>`` itself. For runs that end by themselves; a test that signals the
    process it started (SIGKILL, SIGTERM) starts ``[sys.executable, "-m", module]`` directly."""
    return [sys.executable, "-I", "-S", str(TESTS_DIR / "launch_entry.py"), module]


@pytest.fixture(scope="session", autouse=True)
def fork_server(tmp_path_factory):
    """This worker's ``tests/forkserver.py``, named by ``HYMTL_TEST_FORKSERVER`` to the entry
    points the tests start (``HYMTL_TEST_FORKSERVER=0``: none; every run a fresh interpreter). It
    does not hold the session up: a run started before its imports are done runs without it."""
    if os.environ.get("HYMTL_TEST_FORKSERVER") == "0":
        yield None
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="hymtl-fs-")  # short: a socket's path has ~100 bytes
    path = os.path.join(folder, "server")
    with open(tmp_path_factory.mktemp("fork_server") / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, str(TESTS_DIR / "forkserver.py"), path],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT)
    patch = pytest.MonkeyPatch()
    patch.setenv("HYMTL_TEST_FORKSERVER", path)
    yield path
    patch.undo()
    stop_process(server, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not ended within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The ants/bees folder. Under CI (``CI`` set) a missing folder fails instead of skipping."""
    path = Path(os.environ.get("HYMTL_TEST_DATA", DEFAULT_REAL_DATA)).resolve()
    if not (path / "train").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"HYMTL_TEST_DATA={path} has no train/ folder (required under CI)")
        pytest.skip(f"real data not found at {path} (set HYMTL_TEST_DATA)")
    return path


@pytest.fixture
def compose():
    """Compose ``conf/`` with overrides through Hydra's compose API (with ``hydra.runtime`` set)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hymtl.cli import register_resolvers
    from hymtl.runtime import config_dir

    register_resolvers()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of ``TransferModule`` (efficientnet_lite0, random init, one
    training step on the tiny colour images of ``<checkpoint dir>/images``)."""
    import lightning.pytorch as pl

    from hymtl.data import ImageFolderDataModule
    from hymtl.model import TransferModule

    root = make_image_folder(tmp_path_factory.mktemp("tiny_checkpoint") / "images")
    datamodule = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0)
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2,
                           class_names=datamodule.class_names, unfreeze_at_epoch=None)
    datamodule.preprocessing = model.preprocessing
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    path = root.parent / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def real_checkpoint(real_data: Path, tmp_path_factory) -> Path:
    """A run of ``hymtl.train`` on the ants/bees data (frozen ImageNet efficientnet_lite0, a few
    steps): ``<run>/checkpoints/*.ckpt`` beside ``<run>/.hydra/config.yaml``.

    On images, not cached features: the run takes 4 batches of 16 and one of validation, while
    precomputing would run the backbone over every image of both splits first (train with its
    augmented views: ~900 images instead of 80)."""
    run = tmp_path_factory.mktemp("real_run") / "run"
    result = subprocess.run(
        [*entry_command("hymtl.train"), "mode=frozen", "model=efficientnet_lite0", "data=folder",
         f"data.root={real_data}", "mode.epochs=1", "mode.precompute_features=false", "data.batch_size=16",
         "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "test=false", f"hydra.run.dir={run}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
    )
    if result.returncode != 0:
        pytest.fail(f"training the fixture run failed:\n{result.stderr[-3000:]}")
    ckpts = sorted((run / "checkpoints").glob("best-*.ckpt")) or sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts, f"no checkpoint in {run}"
    return ckpts[0]


# --------------------------------------------------------------------------- other shapes of data
def write_label_table(path: Path, rows: list[tuple], header: tuple = ("filename", "label")) -> Path:
    """A CSV (``.csv``), TSV (``.tsv``) or JSON-lines (``.jsonl``) label file of ``rows``."""
    import csv
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def folder_as_table(root: Path, table: Path) -> Path:
    """The class folders ``root/<split>/<class>/*`` as a label file with a split column."""
    rows = []
    for split in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for image in sorted((root / split).glob("*/*")):
            rows.append((os.path.relpath(image, table.parent), image.parent.name, split))
    return write_label_table(table, rows, ("filename", "label", "split"))


def folder_as_parquet(root: Path, out: Path, struct: bool = False) -> Path:
    """The class folders ``root/<split>/<class>/*`` as Hugging Face style Parquet files
    (``out/<split>-00000-of-00001.parquet``: image bytes, integer labels named in the schema's
    metadata; ``struct``: images as ``{bytes, path}`` structs)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    splits = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = sorted({p.name for split in splits for p in (root / split).iterdir() if p.is_dir()})
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    for split in splits:
        images = sorted((root / split).glob("*/*"))
        cells = [{"bytes": p.read_bytes(), "path": p.name} if struct else p.read_bytes() for p in images]
        table = pa.table({"image": cells, "label": [names.index(p.parent.name) for p in images]})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        pq.write_table(table, out / f"{'validation' if split == 'val' else split}-00000-of-00001.parquet")
    return out


MULTILABEL_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_multilabel_set(root: Path, count: int = 48, seed: int = 0, size: int = 64) -> Path:
    """Procedural multi-label images: a grey canvas with a coloured square for each of its labels
    (each of red/green/blue present with probability 1/2; some images have none), and
    ``root/labels.csv`` with a ``labels`` column (``red|blue``)."""
    from PIL import ImageDraw

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        labels = [name for name in MULTILABEL_COLORS if rng.random() < 0.5]
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for name in labels:
            x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
            draw.rectangle([x, y, x + size // 3, y + size // 3], fill=MULTILABEL_COLORS[name])
        path = root / "images" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append((f"images/{i:03d}.png", "|".join(labels)))
    write_label_table(root / "labels.csv", rows, ("filename", "labels"))
    return root / "labels.csv"

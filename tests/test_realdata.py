"""Issue 2's accuracy targets on the real ants/bees data, offline (``model=efficientnet_lite0``),
with the shipped defaults of conf/mode/*.yaml, through the train entry point as users run it.

Targets (test = val split of ants/bees, 153 images): frozen >= 0.93, finetune >= 0.94,
two_phase >= 0.95. No timing assertions: speed is measured by benchmarks/time_to_accuracy.py.

finetune's best val accuracy moves by a few images with the random stream alone: the same recipe
gave 0.954 (146/153) with persistent DataLoader workers and 0.948 (145/153) with fresh workers
per epoch (the default since resume became exact with workers), and from epoch to epoch of one
run val/acc moves between 0.92 and 0.954. The target sits below the best-epoch spread
(0.948-0.954), so a failure means a regression rather than an unlucky draw.

The runs that train the backbone stop at the first epoch whose val/acc reaches the target
(Lightning's ``EarlyStopping(stopping_threshold=…)``, patience out of reach). The assertion keeps
its meaning: here val doubles as test and the run's model is its best val/acc checkpoint, so the
full run's test/acc is its best epoch's val/acc, which reaches the target exactly when some epoch
does; the epochs before the stop are the full run's (the schedule still spans mode.epochs). It
saves the epochs after the target is reached: finetune reached 0.94 after 1 of its 6 epochs
(~35 s of CPU each) in the last runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import cached_rows
from test_train import run_train

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TARGETS = {"frozen": 0.93, "finetune": 0.94, "two_phase": 0.95}


def train_real(mode: str, real_data: Path, tmp_path: Path, cache: Path, name: str, *extra: str) -> dict:
    result = run_train(f"mode={mode}", "model=efficientnet_lite0", f"data.root={real_data}", f"hydra.run.dir={name}",
                       *extra, cwd=tmp_path, env={"HYMTL_CACHE_DIR": str(cache), "HYMTL_OFFLINE": "1"}, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def frozen_run(real_data, tmp_path_factory) -> tuple[Path, dict]:
    """The frozen run with the shipped defaults on an empty feature cache (``<base>/cache``), made
    once: its accuracy is one target, and the rerun test reads the cache it filled."""
    base = tmp_path_factory.mktemp("frozen_real")
    return base, train_real("frozen", real_data, base, base / "cache", "first")


def stop_at(target: float) -> list[str]:
    """Overrides that end the fit at the first epoch whose val/acc reaches ``target``, and only then."""
    return ["callbacks=early_stopping", f"+callbacks.early_stopping.stopping_threshold={target}",
            "callbacks.early_stopping.patience=1000"]


@pytest.mark.parametrize("mode", ["frozen", "finetune", "two_phase"])
def test_mode_reaches_its_target(mode, real_data, tmp_path, request):
    if mode == "frozen":
        metrics = request.getfixturevalue("frozen_run")[1]
    else:
        if mode == "two_phase":
            # its head epochs run on the features the frozen run extracted (the same images,
            # backbone, views and seed: the same cache rows), from a copy, which leaves the
            # rerun test the cache as the frozen run wrote it (its extraction: ~9 s on 2 threads, not repeated)
            shutil.copytree(request.getfixturevalue("frozen_run")[0] / "cache", tmp_path / "cache")
        metrics = train_real(mode, real_data, tmp_path, tmp_path / "cache", "run", *stop_at(TARGETS[mode]))
    assert metrics["mode"] == mode and metrics["backbone"] == "efficientnet_lite0"
    assert metrics["test/acc"] >= TARGETS[mode], metrics


def test_frozen_rerun_reads_the_cache_and_gives_the_same_model(real_data, frozen_run):
    base, first = frozen_run
    cache = base / "cache"
    shards = sorted(cache.rglob("*.safetensors"))
    rows = cached_rows(cache)
    assert rows >= 390  # one row per image of train + val (test = val): ~398
    # in a few shards, not a file per image: one per split and per flush_seconds (30) of its
    # extraction, so the bound follows the run's own extraction times (a slow machine flushes more)
    seconds = [float(s) for s in re.findall(r"feature extraction: \d+ images in (\d+\.\d)s",
                                           (base / "first" / "train.log").read_text())]
    assert seconds and len(shards) <= sum(1 + s // 30 for s in seconds) < rows / 10, (len(shards), seconds)
    stamps = [(f, f.stat().st_mtime_ns) for f in shards]
    second = train_real("frozen", real_data, base, cache, "second")
    assert [(f, f.stat().st_mtime_ns) for f in sorted(cache.rglob("*.safetensors"))] == stamps  # nothing recomputed
    assert second["test/acc"] == first["test/acc"] and second["test/loss"] == pytest.approx(first["test/loss"])

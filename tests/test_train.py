"""The train entry point as users run it: a subprocess, Hydra's run dir, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import REPO_ROOT, entry_command

TINY_MODEL = ["model=efficientnet_lite0", "model.pretrained=false", "data.num_workers=0", "data.batch_size=4"]


def run_train(*overrides: str, cwd: Path, env: dict | None = None, module: str = "hymtl.train",
              timeout: int = 900) -> subprocess.CompletedProcess:
    # the timeouts of the tests are hang guards, not speed checks: ten times what the work needs
    # on a quiet 2-core machine, so that a machine ten times slower still passes
    return subprocess.run(
        [*entry_command(module), *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_fast_dev_run_writes_one_run_dir(tiny_folder, tmp_path):
    result = run_train(*TINY_MODEL, "mode=two_phase", "data=folder", f"data.root={tiny_folder}",
                       "+trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["ants", "bees"] and metrics["test_split"] == "val"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["mode"] == "two_phase"
    assert "val split doubles as the test split" in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(l.startswith("loss ") and ", train acc " in l and ", test acc " in l for l in lines)
    assert any(l.endswith("examples/sec on cpu") for l in lines)


@pytest.mark.slow
def test_checkpoints_best_and_last_and_same_seed_same_metrics(tiny_folder, tmp_path):
    args = [*TINY_MODEL, "mode=finetune", "mode.epochs=2", "data=folder", f"data.root={tiny_folder}",
            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    first = run_train(*args, "hydra.run.dir=run1", cwd=tmp_path)
    second = run_train(*args, "hydra.run.dir=run2", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "run1" / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list((tmp_path / "run1" / "tensorboard").glob("events.out.tfevents.*"))
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("run1", "run2"))
    for key in ("train/loss", "train/acc", "val/acc", "test/acc", "test/loss"):
        assert m1[key] == m2[key], key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=folder", "data.root=/does/not/exist"], "error: data folder not found: /does/not/exist"),
        (["model.backbone=resnet19"], "error: unknown backbone 'resnet19'; did you mean resnet18"),
        (["model.lr=-1"], "error: model.lr must be a positive number, got -1"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tiny_folder, tmp_path, overrides, message):
    result = run_train(*TINY_MODEL, "data=folder", f"data.root={tiny_folder}", *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


@pytest.mark.slow
def test_resnet18_offline_fails_fast_naming_the_file_and_the_offline_backbone(tiny_folder, tmp_path):
    result = run_train("data=folder", f"data.root={tiny_folder}", "model=resnet18", cwd=tmp_path,
                       env={"TORCH_HOME": str(tmp_path / "torch"), "HYMTL_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "resnet18-f37072fd.pth" in last and str(tmp_path / "torch" / "hub" / "checkpoints") in last
    assert "model=efficientnet_lite0" in last


@pytest.mark.slow
def test_conf_ships_in_the_wheel_and_is_found_after_pip_install(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO_ROOT)], check=True, timeout=900)
    wheel = next(wheel_dir.glob("hymtl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hymtl/conf/config.yaml" in names and "hymtl/conf/mode/two_phase.yaml" in names
    assert "hymtl/manifests/hymenoptera_data.sha256" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=900)
    # from an unrelated folder, with only the installed copy of hymtl importable
    result = run_train("mode=frozen", "--cfg", "job", cwd=tmp_path, env={"PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: frozen" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import hymtl.runtime as r; print(r.config_dir())"],
                           cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert probe.stdout.strip() == str(target / "hymtl" / "conf")


@pytest.mark.slow
def test_a_direct_regime_override_reaches_every_reader(tiny_folder, tmp_path):
    """`mode=frozen model.unfreeze_at_epoch=2`: model.* is the regime's one home, so the feature
    serving (on in mode=frozen) stops at epoch 2 too and the backbone trains from there: its
    weights are the pretrained ones through epoch 1 and differ after epoch 2."""
    import torch

    from hymtl.backbones import create_backbone

    result = run_train("model=efficientnet_lite0", "data.num_workers=0", "data.batch_size=4", "mode=frozen",
                       "model.unfreeze_at_epoch=2", "mode.epochs=3", "data=folder", f"data.root={tiny_folder}",
                       "+callbacks.model_checkpoint.save_top_k=-1", "test=false", "hydra.run.dir=run",
                       f"feature_cache.dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    pretrained = create_backbone("efficientnet_lite0").model.state_dict()
    by_epoch = {}
    for path in (tmp_path / "run" / "checkpoints").glob("best-epoch*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        by_epoch[int(path.name[len("best-epoch"):][:2])] = state
    assert sorted(by_epoch) == [0, 1, 2]
    weight = "conv_stem.weight"  # a parameter: only an optimizer step changes it
    assert torch.equal(by_epoch[1][f"backbone.{weight}"], pretrained[weight])
    assert not torch.equal(by_epoch[2][f"backbone.{weight}"], pretrained[weight])


@pytest.mark.slow
def test_two_phase_that_ends_before_its_switch_is_refused(tiny_folder, tmp_path):
    result = run_train(*TINY_MODEL, "mode=two_phase", "mode.freeze_epochs=3", "mode.epochs=3", "data=folder",
                       f"data.root={tiny_folder}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the backbone unfreezes at epoch 3 but the run ends after 3 epochs: "
        "set mode.epochs > 3 (or a smaller mode.freeze_epochs)")


@pytest.mark.slow
def test_a_run_that_fails_before_training_is_listed_as_failed(tmp_path):
    from hymtl import summaries

    result = run_train(*TINY_MODEL, "data=folder", "data.root=/does/not/exist", "hydra.run.dir=runs/0", cwd=tmp_path)
    assert result.returncode == 2
    error = json.loads((tmp_path / "runs" / "0" / "error.json").read_text())
    assert error["error"] == "data folder not found: /does/not/exist" and error["type"] == "DataError"
    [run] = summaries.collect_runs(tmp_path / "runs")
    assert run.status == "failed"


class LastCheckpointProbe(Callback):
    """Records, as each epoch starts, which epoch ``last.ckpt`` holds (``None``: not written yet)."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self.seen.append(torch.load(last, map_location="cpu", weights_only=True)["epoch"] if last.is_file() else None)

    def on_fit_end(self, trainer, pl_module):
        (Path(trainer.default_root_dir) / "last_seen.json").write_text(json.dumps(self.seen))


# a day: longer than the run on any machine, however slow (an interval is measured in wall time)
@pytest.mark.parametrize("interval, seen", [(0, [None, 0, 1, 2]), (86_400, [None, None, None, None])])
@pytest.mark.slow
def test_last_checkpoint_is_written_at_most_once_per_interval_and_after_the_last_epoch(tiny_folder, tmp_path,
                                                                                       interval, seen):
    env = {"PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = run_train(*TINY_MODEL, "mode=frozen", "mode.epochs=4", "data=folder", f"data.root={tiny_folder}",
                       "test=false", "hydra.run.dir=run", f"feature_cache.dir={tmp_path / 'cache'}",
                       f"callbacks.last_checkpoint.min_interval_s={interval}",
                       "+callbacks.probe._target_=test_train.LastCheckpointProbe", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "last_seen.json").read_text()) == seen
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3  # the fit's end: always saved


@pytest.mark.slow
def test_last_checkpoint_is_the_last_epoch_even_when_val_acc_stops_improving(tiny_folder, tmp_path):
    """Lightning's save_last writes only when val/acc improves; last.ckpt must be the final epoch."""
    result = run_train("model=efficientnet_lite0", "data.num_workers=0", "data.batch_size=4", "mode=frozen",
                       "mode.epochs=3", "data=folder", f"data.root={tiny_folder}", "test=false",
                       "hydra.run.dir=run", f"feature_cache.dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    [best] = checkpoints.glob("best-*.ckpt")
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    # the colours are told apart at once: val/acc stopped improving after the first epoch
    assert best.name.startswith("best-epoch00"), best.name


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(tiny_folder, tmp_path):
    (tmp_path / "run" / "checkpoints" / "last.ckpt").mkdir(parents=True)  # in the way of the write
    result = run_train(*TINY_MODEL, "mode=frozen", "mode.epochs=2", "data=folder", f"data.root={tiny_folder}",
                       "hydra.run.dir=run", "test=false", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}: "), last
    assert not (tmp_path / "run" / "metrics.json").exists()

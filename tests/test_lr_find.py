"""hymtl.lr_find: Lightning's range test on every regime, with the module's parameter groups kept."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import entry_command, make_image, make_image_folder


def run_lr_find(*overrides: str, cwd: Path, cache: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYMTL_CACHE_DIR": str(cache), "HYMTL_OUTPUT_DIR": str(cwd / "outputs")}
    return subprocess.run([*entry_command("hymtl.lr_find"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def module(unfreeze_at_epoch, **kwargs):
    from hymtl.model import TransferModule

    return TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2,
                          unfreeze_at_epoch=unfreeze_at_epoch, **kwargs)


@pytest.mark.parametrize("unfreeze_at_epoch, kwargs, factors", [
    (None, {}, [10.0]),                                          # frozen: the head alone
    (0, {"backbone_lr_mult": 0.5}, [10.0, 0.5]),                 # fine-tune: both groups
    (2, {}, [10.0, 0.0]),                                        # two_phase at its start: backbone at 0
    (0, {"trainable_stages": 1, "head_lr_mult": 3.0}, [3.0, 1.0]),  # partial
])
def test_group_factors_are_the_modules_own(unfreeze_at_epoch, kwargs, factors):
    from hymtl.tuning import GroupFactors

    assert GroupFactors(module(unfreeze_at_epoch, lr=0.01, **kwargs)).factors == pytest.approx(factors)


def test_each_step_runs_every_group_at_its_factor_and_the_swept_rate_is_restored():
    """What the tuner's scheduler sets (one rate for all groups) is scaled per group for the
    step itself, then put back (the tuner records and anneals the swept rate)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from hymtl.tuning import GroupFactors

    net = module(0, lr=0.01, backbone_lr_mult=0.5)
    factors = GroupFactors(net)
    optimizer = net.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = 1e-3  # the tuner's swept rate, the same for every group
    seen = []
    with factors:
        probe = register_optimizer_step_pre_hook(  # runs after GroupFactors' hook
            lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
        try:
            optimizer.step()
        finally:
            probe.remove()
    assert seen == [pytest.approx([1e-2, 5e-4])]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with factors:  # another optimizer is left alone
        other.step()
    assert other.param_groups[0]["lr"] == 0.1


@pytest.fixture(scope="module")
def lr_folder(tmp_path_factory) -> Path:
    """10 images per class and split: 5 batches of 4 in the training split."""
    return make_image_folder(tmp_path_factory.mktemp("lr_find") / "images", per_class=10)


@pytest.mark.slow
@pytest.mark.parametrize("mode, phases, factors", [
    ("frozen", ["head (frozen backbone)"], [[10.0]]),
    ("finetune", ["whole schedule"], [[10.0, 1.0]]),
    ("partial", ["whole schedule"], [[10.0, 1.0]]),
    ("two_phase", ["head phase", "unfrozen phase"], [[10.0], [10.0, 0.5]]),
])
def test_lr_find_in_every_regime(mode, phases, factors, lr_folder, tmp_path):
    result = run_lr_find(f"mode={mode}", "model=efficientnet_lite0", "data=folder", f"data.root={lr_folder}",
                         "data.batch_size=4", "data.num_workers=0", "lr_find.num_training=15",
                         "lr_find.early_stop_threshold=null", cwd=tmp_path, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    paste = [line for line in result.stdout.splitlines() if line.startswith("paste: ")]
    assert len(paste) == 1 and paste[0].startswith("paste: mode.lr="), result.stdout
    saved = list((tmp_path / "outputs" / "lr_find").rglob("lr_find.json"))
    assert len(saved) == 1  # its own run folder
    report = json.loads(saved[0].read_text())
    assert [p["phase"] for p in report["phases"]] == phases
    assert [p["group_factors"] for p in report["phases"]] == factors
    for number, phase in enumerate(report["phases"], start=1):
        plot = saved[0].parent / f"lr_find_{number}.png"
        assert plot.stat().st_size > 1000 and phase["plot"] == str(plot)
        assert phase["suggested_lr"] is not None and 1e-6 <= phase["suggested_lr"] <= 1.0
    assert f"mode.lr={report['phases'][0]['suggested_lr']:.2e}" in paste[0]
    if mode in ("frozen", "partial", "two_phase"):  # the head (phase) trained on cached outputs
        log = (saved[0].parent / "lr_find.log").read_text()
        assert "cached" in log


@pytest.mark.parametrize("per_class, overrides, message", [
    (1, [], "lr_find needs at least 2 training images per class"),
    (6, ["data.batch_size=4"], "lr_find needs at least 4 full batches"),
    (10, ["lr_find.num_training=5"], "lr_find.num_training must be at least 13"),
    (10, ["lr_find.max_lr=1e-7"], "lr_find.max_lr must be above lr_find.min_lr"),
])
def test_bad_lr_find_input_is_one_line(per_class, overrides, message, tmp_path):
    root = tmp_path / "flat"
    for name, color in (("ants", (200, 40, 40)), ("bees", (40, 40, 200))):
        for i in range(per_class):
            make_image(root / name / f"{i}.jpg", color, seed=i)
    result = run_lr_find("mode=frozen", "model=efficientnet_lite0", "model.pretrained=false", "data=folder",
                         f"data.root={root}", "data.val_fraction=0.5", *overrides, cwd=tmp_path, cache=tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr

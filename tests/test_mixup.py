"""mixup and cutmix (``mode.mixup``, ``mode.cutmix``: hymtl.mixing) on images and on cached features."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import REPO_ROOT, entry_command, make_image_folder, make_multilabel_set

from hymtl.errors import HymtlError

TINY_TRAIN = ["model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.batch_size=4",
              "data.num_workers=0"]


def run_module(module: str, *overrides: str, cwd: Path, env: dict | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    # the timeout is a hang guard, not a speed check
    return subprocess.run([*entry_command(module), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(part in errors[0] for part in parts), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def multiclass():
    from hymtl.tasks import make_task

    return make_task({"name": "multiclass"})


def multilabel():
    from hymtl.tasks import make_task

    return make_task({"name": "multilabel"})


# --------------------------------------------------------------------------- the mixer
def test_mixup_blends_inputs_and_targets_with_one_weight():
    from hymtl.mixing import BatchMixer

    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    mixed = BatchMixer(mixup=0.4)(images, labels, multiclass(), 2)
    lam = float(mixed.targets[0, 0])  # image 0 (class 0) is blended with image 3 (class 1): torchvision's pairing
    assert 0.0 < lam < 1.0 and torch.allclose(mixed.targets.sum(1), torch.ones(4))
    assert torch.allclose(mixed.inputs, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    assert torch.allclose(mixed.targets, lam * F.one_hot(labels, 2) + (1 - lam) * F.one_hot(labels.roll(1, 0), 2))
    # the training metrics see the label of each mix's larger part
    assert torch.equal(mixed.labels, labels if lam >= 0.5 else labels.roll(1, 0))
    assert mixed.labels.dtype == labels.dtype and mixed.cached is False


def test_it_is_torchvisions_mixup():
    from torchvision.transforms import v2

    from hymtl.mixing import BatchMixer

    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(3)
    ours = BatchMixer(mixup=0.2)(images, labels, multiclass(), 3)
    torch.manual_seed(3)
    theirs = v2.MixUp(alpha=0.2, num_classes=3)(images, labels)
    assert torch.equal(ours.inputs, theirs[0]) and torch.equal(ours.targets, theirs[1])


def _cut_fraction(mixed: torch.Tensor, inputs: torch.Tensor) -> float:
    """The fraction of cells of ``mixed`` taken from the paired input (a cutmix box)."""
    rolled = inputs.roll(1, 0)
    from_pair = (mixed == rolled).all(dim=1) & ~(mixed == inputs).all(dim=1)  # per (n, h, w) cell
    kept = (mixed == inputs).all(dim=1) | from_pair
    assert bool(kept.all()), "cutmix pastes cells, it does not blend them"
    return float(from_pair[0].float().mean())


def test_cutmix_pastes_a_box_of_the_activation_map_and_weighs_the_targets_by_its_area():
    from hymtl.mixing import BatchMixer

    maps, labels = torch.rand(4, 16, 7, 7), torch.tensor([0, 1, 0, 1])
    mixer = BatchMixer(cutmix=1.0)
    for seed in range(6):
        torch.manual_seed(seed)
        mixed = mixer(maps, labels, multiclass(), 2, cached=True)
        assert mixed.inputs.shape == maps.shape and mixed.cached
        # image 0 (class 0) keeps 1 - box of itself: its target's weight of class 0 is the area kept
        assert _cut_fraction(mixed.inputs, maps) == pytest.approx(1 - float(mixed.targets[0, 0]), abs=1e-6)


def test_both_on_choose_mixup_or_cutmix_per_batch():
    from hymtl.mixing import BatchMixer

    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    mixer = BatchMixer(mixup=1.0, cutmix=1.0)
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed = mixer(images, labels, multiclass(), 2).inputs
        pasted = bool(((mixed == images) | (mixed == images.roll(1, 0))).all())
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixup_of_cached_pooled_features_keeps_their_shape():
    from hymtl.mixing import BatchMixer

    torch.manual_seed(1)
    features, labels = torch.rand(4, 32), torch.tensor([0, 1, 0, 1])
    mixed = BatchMixer(mixup=0.4)(features, labels, multiclass(), 2, cached=True)
    lam = float(mixed.targets[0, 0])
    assert mixed.inputs.shape == (4, 32) and mixed.cached
    assert torch.allclose(mixed.inputs, lam * features + (1 - lam) * features.roll(1, 0), atol=1e-6)


@pytest.mark.parametrize("settings", [{"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}])
def test_cutmix_on_pooled_features_is_one_line_naming_the_alternative(settings):
    from hymtl.mixing import BatchMixer

    with pytest.raises(HymtlError, match=r"mode.cutmix=1 cuts .* pooled features .*mode.precompute_features=false"):
        BatchMixer(**settings)(torch.rand(4, 32), torch.tensor([0, 1, 0, 1]), multiclass(), 2, cached=True)


def test_multilabel_targets_are_mixed_label_vectors():
    from hymtl.mixing import BatchMixer

    torch.manual_seed(2)
    # red+green, green, blue, none
    labels = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    mixed = BatchMixer(mixup=0.4)(torch.rand(4, 3, 8, 8), labels, multilabel(), 3)
    lam = float(mixed.targets[0, 0])  # red: image 0 only (image 3 has none)
    assert torch.allclose(mixed.targets, lam * labels + (1 - lam) * labels.roll(1, 0))
    assert float(mixed.targets[1, 1]) == pytest.approx(1.0)  # green: both images 1 and 0 have it
    assert torch.equal(mixed.labels, labels if lam > 0.5 else labels.roll(1, 0))  # the larger part's set
    assert mixed.labels.dtype == torch.float32


# --------------------------------------------------------------------------- the loss
def test_soft_target_cross_entropy_is_the_mixed_loss():
    torch.manual_seed(0)
    logits, a, b, lam = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 0, 1, 1, 0]), 0.3
    task = multiclass()
    targets = lam * task.target_vectors(a, 3) + (1 - lam) * task.target_vectors(b, 3)
    for smoothing in (0.0, 0.1):
        criterion = task.loss(None, smoothing)
        by_hand = lam * criterion(logits, a) + (1 - lam) * criterion(logits, b)
        assert torch.allclose(criterion(logits, targets), by_hand, atol=1e-6)
    written_out = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(task.loss(None)(logits, targets), written_out, atol=1e-6)


def test_soft_target_bce_is_the_mixed_loss_label_by_label():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    a = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    b, lam = a.roll(1, 0), 0.7
    task = multilabel()
    criterion = task.loss(torch.tensor([1.0, 2.0, 3.0]))  # pos_weight: still linear in the target
    targets = lam * task.target_vectors(a, 3) + (1 - lam) * task.target_vectors(b, 3)
    assert torch.allclose(criterion(logits, targets), lam * criterion(logits, a) + (1 - lam) * criterion(logits, b),
                          atol=1e-6)


def test_the_training_step_takes_the_mixed_targets_and_scores_the_hard_labels():
    from hymtl.mixing import BatchMixer
    from hymtl.model import TransferModule

    torch.manual_seed(0)
    module = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=3, unfreeze_at_epoch=None,
                            mixup=0.4)
    features, labels = torch.rand(6, module.head[1].in_features), torch.tensor([0, 1, 2, 0, 1, 2])
    batch = BatchMixer(mixup=0.4)(features, labels, module.task, 3, cached=True)
    loss = module._shared_step(batch, "train")
    assert torch.allclose(loss, module.criterion(module(features=batch.inputs), batch.targets))
    accuracy = module.train_metrics["acc"]  # micro: each image is a true positive or a false negative
    assert int((accuracy.tp + accuracy.fn).sum()) == 6  # the hard labels reached the metrics
    assert float(module.train_loss.weight) == 6


def test_the_module_mixes_image_batches_in_its_training_step_only():
    from hymtl.mixing import BatchMixer
    from hymtl.model import TransferModule

    module = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, mixup=0.4).eval()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's: no Trainer here for self.log
        trained = module.training_step([images, labels], 0)
    torch.manual_seed(5)
    mixed = BatchMixer(mixup=0.4)(images, labels, module.task, 2)
    with torch.no_grad():
        assert torch.allclose(trained, module.criterion(module(mixed.inputs), mixed.targets), atol=1e-6)
        assert not torch.allclose(trained, module.criterion(module(images), labels), atol=1e-4)
        validated = module._shared_step([images, labels], "val")  # never mixed
        assert torch.allclose(validated, module.criterion(module(images), labels), atol=1e-6)


# --------------------------------------------------------------------------- configuration
def test_the_alphas_flow_from_mode_to_the_module(compose, tmp_path):
    cfg = compose("mode.mixup=0.2", "mode.cutmix=1.0", "model=efficientnet_lite0", "data=folder",
                  f"data.root={tmp_path}")
    assert (cfg.model.mixup, cfg.model.cutmix) == (0.2, 1.0)
    plain = compose("model=efficientnet_lite0", "data=folder", f"data.root={tmp_path}")
    assert (plain.mode.mixup, plain.mode.cutmix, plain.model.mixup, plain.model.cutmix) == (0, 0, 0, 0)


def test_the_module_keeps_the_alphas_and_mixes_only_when_asked():
    from hymtl.model import TransferModule

    off = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2)
    on = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, mixup=0.2, cutmix=1.0)
    assert off.batch_mixer is None and (off.hparams.mixup, off.hparams.cutmix) == (0.0, 0.0)
    assert (on.batch_mixer.mixup, on.batch_mixer.cutmix) == (0.2, 1.0) and on.hparams.mixup == 0.2


@pytest.mark.parametrize("override, message", [
    ("mode.mixup=-1", "mode.mixup must not be negative, got -1"),
    ("mode.cutmix=abc", "mode.cutmix must be a number, got 'abc'"),
    ("mode.mixup=nan", "mode.mixup must be a number, got nan"),
])
def test_bad_alphas_are_refused_by_the_number_rules(compose, tmp_path, override, message):
    from hymtl.config import check_numbers

    with pytest.raises(HymtlError) as info:
        check_numbers(compose(override, "data=folder", f"data.root={tmp_path}"))
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, message", [({"mixup": -1}, "model.mixup must not be negative"),
                                             ({"cutmix": "abc"}, "model.cutmix must be a number")])
def test_bad_alphas_are_refused_by_the_module(kwargs, message):
    from hymtl.model import TransferModule

    with pytest.raises(HymtlError, match=message):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("override, parts", [("mode.mixup=-1", ("mode.mixup", "-1")),
                                             ("mode.cutmix=abc", ("cutmix", "abc"))])
def test_bad_alphas_on_the_command_line_are_one_line(tmp_path, tiny_folder, override, parts):
    result = run_module("hymtl.train", override, *TINY_TRAIN, f"data.root={tiny_folder}", "+trainer.fast_dev_run=true",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    one_error_line(result, *parts)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- training, every kind of input
@pytest.fixture(scope="module")
def mixup_run(tmp_path_factory):
    """``hymtl.train mode=finetune mode.mixup=0.2 mode.cutmix=1.0`` (images, one epoch), tested."""
    base = tmp_path_factory.mktemp("mixup_run")
    root = make_image_folder(base / "images")
    run = base / "run"
    result = run_module("hymtl.train", "mode=finetune", "mode.mixup=0.2", "mode.cutmix=1.0", *TINY_TRAIN,
                        f"data.root={root}", "mode.epochs=1", "callbacks.last_checkpoint.min_interval_s=0",
                        f"hydra.run.dir={run}", cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, root, run


@pytest.mark.slow
def test_checkpoint_test_and_export_after_a_mixup_run(mixup_run):
    from hymtl.model import load_checkpoint

    base, root, run = mixup_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and 0.0 <= metrics["train/acc"] <= 1.0
    ckpt = run / "checkpoints" / "last.ckpt"
    model = load_checkpoint(ckpt)  # the one reader: the alphas are hyperparameters like the others
    assert (model.hparams.mixup, model.hparams.cutmix) == (0.2, 1.0)
    onnx = base / "model.onnx"
    exported = run_module("hymtl.export", f"ckpt_path={ckpt}", "format=onnx", f"out={onnx}", cwd=base)
    assert exported.returncode == 0 and onnx.is_file(), exported.stderr[-3000:]
    evaluated = run_module("hymtl.eval", f"ckpt_path={ckpt}", f"data.root={root}", "data.num_workers=0",
                           f"hydra.run.dir={base / 'eval'}", cwd=base)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 0.0 <= json.loads((base / "eval" / "eval.json").read_text())["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode, alphas", [("frozen", ["mode.mixup=0.2"]),
                                          ("partial", ["mode.mixup=0.2", "mode.cutmix=1.0"])])
def test_mixing_cached_features_trains(tmp_path, tiny_folder, mode, alphas):
    run = tmp_path / "run"
    result = run_module("hymtl.train", f"mode={mode}", *alphas, *TINY_TRAIN, f"data.root={tiny_folder}",
                        "+trainer.fast_dev_run=true", f"hydra.run.dir={run}", cwd=tmp_path,
                        env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # trained on the cache, not on images
    said = result.stderr + "".join(p.read_text() for p in run.rglob("*.log"))
    assert "not the images (feature mixup)" in said  # said, not hidden


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "two_phase"])
def test_cutmix_on_cached_pooled_features_is_one_line(tmp_path, tiny_folder, mode):
    result = run_module("hymtl.train", f"mode={mode}", "mode.cutmix=1.0", *TINY_TRAIN, f"data.root={tiny_folder}",
                        "mode.epochs=3", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    one_error_line(result, "mode.cutmix=1", "pooled features", "mode.precompute_features=false")
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # stopped before any step


@pytest.mark.slow
def test_cutmix_without_the_cache_cuts_the_images_of_a_frozen_run(tmp_path, tiny_folder):
    result = run_module("hymtl.train", "mode=frozen", "mode.cutmix=1.0", "mode.precompute_features=false",
                        *TINY_TRAIN, f"data.root={tiny_folder}", "+trainer.fast_dev_run=true",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_multilabel_mixup_trains(tmp_path):
    table = make_multilabel_set(tmp_path / "set", count=12)
    result = run_module("hymtl.train", "task=multilabel", "data=table", f"data.file={table}", "mode=finetune",
                        "mode.mixup=0.2", "mode.cutmix=1.0", *[o for o in TINY_TRAIN if o != "data=folder"],
                        "+trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_recipes_benchmark_skips_cutmix_where_the_cache_holds_pooled_features():
    from conftest import load_script

    bench = load_script(REPO_ROOT / "benchmarks" / "recipes.py", "bench_recipes_mixup")
    assert "mode.mixup=0.2" in bench.RECIPES and "mode.cutmix=1.0" in bench.RECIPES
    assert bench.applies("mode.mixup=0.2", "frozen") and bench.applies("mode.cutmix=1.0", "partial")
    assert not bench.applies("mode.cutmix=1.0", "frozen") and not bench.applies("mode.cutmix=1.0", "two_phase")
    assert bench.applies("mode.cutmix=1.0 mode.precompute_features=false", "frozen")

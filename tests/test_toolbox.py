"""The practitioner's toolbox: augmentation recipes (augment=), EMA (callbacks=ema), TTA (tta=)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, entry_command, make_image_folder

from hymtl.errors import HymtlError

TINY_TRAIN = ["model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.batch_size=4",
              "data.num_workers=0"]


def run_module(module: str, *overrides: str, cwd: Path = REPO_ROOT, env: dict | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command(module), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and text in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- augment=
@pytest.mark.parametrize("recipe, expected", [
    ("default", ["RandomResizedCrop", "RandomHorizontalFlip"]),
    ("trivial", ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide"]),
    ("randaug", ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment(", "num_ops=2", "magnitude=9"]),
    ("none", ["CenterCrop"]),
])
def test_augment_recipes_reach_the_training_transform(compose, tiny_folder, tmp_path, recipe, expected):
    from hydra.utils import instantiate
    from PIL import Image

    from hymtl.data.images import build_transforms

    datamodule = instantiate(compose(f"augment={recipe}", *TINY_TRAIN, f"data.root={tiny_folder}",
                                     f"paths.output_dir={tmp_path}").data, features=None)
    assert datamodule.augment.name == recipe
    train = build_transforms(datamodule.preprocessing, train=True, augment=datamodule.augment)
    text = repr(train)
    assert all(part in text for part in expected), text
    others = {"default": [], "trivial": ["RandAugment"], "randaug": ["Trivial"],
              "none": ["RandomResizedCrop", "Flip", "Trivial", "RandAugment"]}[recipe]
    assert not any(part in text for part in others), text
    image = Image.open(next(tiny_folder.rglob("*.jpg"))).convert("RGB")
    assert train(image).shape == (3, 224, 224) and train(image).dtype == torch.float32
    if recipe == "none":  # the training images are prepared as evaluation images
        assert repr(train) == repr(build_transforms(datamodule.preprocessing, train=False))
    # the loaders use it: the training split's dataset holds the recipe's transform
    datamodule.setup("fit")
    assert repr(datamodule.train_dataloader().dataset.transform) == text


def test_the_recipe_is_part_of_the_feature_cache_fingerprint(compose, tiny_folder, tmp_path):
    """With the feature cache, augment decides what the cached augmented views are: another
    recipe is another fingerprint (another cache folder), the default one is unchanged."""
    from hydra.utils import instantiate

    from hymtl.features import MultiViewDataset

    recipes = {}
    for recipe in ("default", "trivial", "randaug", "none"):
        datamodule = instantiate(compose(f"augment={recipe}", *TINY_TRAIN, f"data.root={tiny_folder}",
                                         f"paths.output_dir={tmp_path}").data,
                                 features=None)
        datamodule.setup("fit")
        recipes[recipe] = MultiViewDataset(datamodule.train_samples, datamodule.preprocessing, 2,
                                           augment=datamodule.augment).recipe
    assert len(set(recipes.values())) == 4
    plain = instantiate(compose(*TINY_TRAIN, f"data.root={tiny_folder}", f"paths.output_dir={tmp_path}").data, features=None)
    plain.setup("fit")
    # the default recipe keeps the fingerprint of the caches written before recipes existed
    assert MultiViewDataset(plain.train_samples, plain.preprocessing, 2).recipe == recipes["default"]


def test_cached_views_follow_the_recipe(compose, tiny_folder, tmp_path):
    from hydra.utils import instantiate

    from hymtl.features import MultiViewDataset

    views = {}
    for recipe in ("none", "trivial"):
        datamodule = instantiate(compose(f"augment={recipe}", *TINY_TRAIN, f"data.root={tiny_folder}",
                                         f"paths.output_dir={tmp_path}").data,
                                 features=None)
        datamodule.setup("fit")
        views[recipe], _digest = MultiViewDataset(datamodule.train_samples, datamodule.preprocessing, 2,
                                                  augment=datamodule.augment)[0]
    none = views["none"]
    assert torch.equal(none[0], none[1]) and torch.equal(none[0], none[2])  # no augmentation: copies
    assert torch.equal(views["trivial"][0], none[0])  # the plain view is the evaluation view either way
    assert not torch.equal(views["trivial"][1], views["trivial"][0])


def test_unknown_recipe_lists_the_choices(compose):
    with pytest.raises(Exception) as info:
        compose("augment=nonsense")
    assert all(name in str(info.value) for name in ("default", "none", "randaug", "trivial")), str(info.value)


def test_unknown_recipe_on_the_command_line_fails_before_training(tmp_path, tiny_folder):
    result = run_module("hymtl.train", "augment=nonsense", *TINY_TRAIN, f"data.root={tiny_folder}",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0 and "augment" in result.stderr and "nonsense" in result.stderr
    assert "trivial" in result.stderr  # the options are listed
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"flip": "yes"}, "augment.flip must be true or false"),
    ({"random_crop": 1}, "augment.random_crop must be true or false"),
    ({"policy": "TrivialAugmentWide"}, "augment.policy must be a torchvision transform"),
])
def test_bad_recipe_values_are_one_line(kwargs, message):
    from hymtl.data.images import AugmentRecipe

    with pytest.raises(HymtlError, match=message):
        AugmentRecipe(**kwargs)


@pytest.mark.slow
def test_training_with_a_recipe_on_cached_features(tmp_path, tiny_folder):
    """mode=frozen with augment=trivial: the head trains on cached views made by the recipe."""
    result = run_module("hymtl.train", "mode=frozen", "augment=trivial", *TINY_TRAIN, f"data.root={tiny_folder}",
                        "+trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "cache").rglob("*.safetensors"))


# --------------------------------------------------------------------------- EMA
def test_ema_settings_are_checked():
    from hymtl.ema import ExponentialMovingAverage

    for kwargs, message in (({"decay": 1.0}, "decay must be a number in"), ({"decay": "x"}, "decay must be"),
                            ({"every_n_steps": 0}, "every_n_steps"), ({"start_step": -1}, "start_step")):
        with pytest.raises(HymtlError, match=message):
            ExponentialMovingAverage(**kwargs)


def test_warmup_decay_follows_the_update_count():
    from hymtl.ema import WarmupEMA

    update = WarmupEMA(0.999)
    averaged, current = torch.zeros(3), torch.ones(3)
    # update n=1: decay min(0.999, 2/11): the average moves most of the way
    assert torch.allclose(update(averaged, current, torch.tensor(1)), torch.full((3,), 1 - 2 / 11))
    assert torch.allclose(update(averaged, current, torch.tensor(10**6)), torch.full((3,), 0.001), atol=1e-6)


def _fit_with_ema(root: Path, ckpt_dir: Path, max_epochs: int, ckpt_path: str | None = None, probe=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hymtl.data import ImageFolderDataModule
    from hymtl.ema import ExponentialMovingAverage
    from hymtl.model import TransferModule

    pl.seed_everything(0)
    datamodule = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, backbone="efficientnet_lite0")
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2,
                           class_names=datamodule.class_names, unfreeze_at_epoch=0, lr=0.05)
    ema = ExponentialMovingAverage(decay=0.9)
    callbacks = [ema, ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                      enable_version_counter=False)] + ([probe] if probe else [])
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer, model, ema, datamodule


@pytest.mark.slow
def test_ema_is_validated_checkpointed_tested_and_resumed(tmp_path, tiny_folder):
    import lightning.pytorch as pl

    checkpoints = tmp_path / "ck"
    seen = {}

    class ValidatedWeights(pl.Callback):
        def on_validation_epoch_start(self, trainer, module):  # after the EMA's swap (callback order)
            seen["validated"] = module.head[1].weight.detach().clone()

    trainer, model, ema, datamodule = _fit_with_ema(tiny_folder, checkpoints, 1, probe=ValidatedWeights())
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    key = "head.1.weight"
    average = ema._average_model.module.state_dict()[key]
    assert torch.equal(checkpoint["state_dict"][key], average)  # the checkpoint's weights: the EMA
    assert not torch.equal(checkpoint["current_model_state"][key], average)  # the training weights beside it
    # what is not averaged (val/acc_best's running max) is the training module's, not the copy's -inf
    assert torch.equal(checkpoint["state_dict"]["val_acc_best.max_value"], model.val_acc_best.max_value)
    assert torch.isfinite(checkpoint["state_dict"]["val_acc_best.max_value"])
    assert torch.equal(seen["validated"], average)  # validation ran on the EMA
    assert torch.equal(model.state_dict()[key], average)  # after fit the module holds the EMA
    # trainer.test(best) right after fit tests the EMA (Lightning's own callback would load the raw weights)
    trainer.test(model, datamodule=datamodule, ckpt_path=str(checkpoints / "last.ckpt"), weights_only=True,
                 verbose=False)
    assert torch.equal(model.state_dict()[key], checkpoint["state_dict"][key])

    resumed = {}

    class ResumedState(pl.Callback):
        def on_train_start(self, trainer, module):
            ema_callback = next(c for c in trainer.callbacks if type(c).__name__ == "ExponentialMovingAverage")
            resumed["training"] = module.head[1].weight.detach().clone()
            resumed["average"] = ema_callback._average_model.module.head[1].weight.detach().clone()
            resumed["count"] = int(ema_callback._average_model.n_averaged)

    _fit_with_ema(tiny_folder, tmp_path / "ck2", 2, ckpt_path=str(checkpoints / "last.ckpt"), probe=ResumedState())
    assert torch.equal(resumed["training"], checkpoint["current_model_state"][key])  # training goes on from the raw weights
    assert torch.equal(resumed["average"], checkpoint["state_dict"][key])  # and the average from the average
    assert resumed["count"] == int(checkpoint["averaging_state"]["n_averaged"]) > 0


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """``hymtl.train callbacks=ema`` (fine-tune, one epoch) and its ONNX export."""
    base = tmp_path_factory.mktemp("ema_run")
    root = make_image_folder(base / "images")
    run = base / "run"
    result = run_module("hymtl.train", "mode=finetune", "callbacks=ema", "mode.lr=0.05", *TINY_TRAIN,
                        f"data.root={root}", "mode.epochs=1", "test=false",
                        "callbacks.last_checkpoint.min_interval_s=0", f"hydra.run.dir={run}", cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    onnx = base / "model.onnx"
    exported = run_module("hymtl.export", f"ckpt_path={ckpt}", "format=onnx", f"out={onnx}", cwd=base)
    assert exported.returncode == 0, exported.stderr[-3000:]
    return root, ckpt, onnx


@pytest.mark.slow
def test_ema_weights_are_what_the_checkpoint_and_the_export_hold(ema_run):
    from hymtl.inference import OnnxPredictor, TorchPredictor, iter_batches
    from hymtl.loading import load_onnx
    from hymtl.model import load_checkpoint

    root, ckpt, onnx = ema_run
    checkpoint = torch.load(ckpt, weights_only=True)
    assert "current_model_state" in checkpoint and "averaging_state" in checkpoint
    key = "head.1.weight"
    assert not torch.equal(checkpoint["state_dict"][key], checkpoint["current_model_state"][key])
    ema_model = load_checkpoint(ckpt)  # hymtl's one reader: the checkpoint's state_dict
    assert torch.equal(ema_model.state_dict()[key], checkpoint["state_dict"][key])
    raw_model = load_checkpoint(ckpt)
    raw_model.load_state_dict(checkpoint["current_model_state"])

    session, meta = load_onnx(onnx)
    exported = OnnxPredictor(session, meta)
    paths = [str(p) for p in sorted(root.rglob("*.jpg"))]
    _, images, _ = next(iter_batches(paths, exported.preprocessing, batch_size=len(paths), num_workers=0))
    onnx_logits = exported.logits(images)
    ema_logits = TorchPredictor(ema_model, simplify=False).logits(images)
    raw_logits = TorchPredictor(raw_model, simplify=False).logits(images)
    assert np.abs(onnx_logits - ema_logits).max() < 1e-4
    assert np.abs(onnx_logits - raw_logits).max() > 10 * np.abs(onnx_logits - ema_logits).max()


# --------------------------------------------------------------------------- TTA
def test_tta_averages_the_views_probabilities(tiny_checkpoint, tiny_folder):
    from hymtl.inference import TorchPredictor, TTAPredictor, iter_batches, predict, softmax
    from hymtl.model import load_checkpoint

    plain = TorchPredictor(load_checkpoint(tiny_checkpoint), simplify=False)
    paths = [str(p) for p in sorted(tiny_folder.rglob("*.jpg"))][:6]
    _, images, _ = next(iter_batches(paths, plain.preprocessing, batch_size=6, num_workers=0))
    flip = TTAPredictor(plain, "flip")
    expected = (softmax(plain.logits(images)) + softmax(plain.logits(images.flip(-1)))) / 2
    result = predict(flip, paths, topk=2, batch_size=4, num_workers=0)
    assert np.allclose(softmax(result.logits), expected, atol=1e-5)
    top = {p.path: dict(p.top) for p in result.predictions}
    for row, path in enumerate(paths):
        assert np.allclose([top[path][name] for name in plain.class_names], expected[row], atol=1e-5)

    five = predict(TTAPredictor(plain, "five_crop"), paths, batch_size=4, num_workers=0)
    assert five.logits.shape == (6, 2) and np.allclose(softmax(five.logits).sum(axis=1), 1)
    none = predict(plain, paths, batch_size=4, num_workers=0)
    assert not np.allclose(five.logits, none.logits)


def test_tta_parity_between_pytorch_and_onnx(ema_run):
    from hymtl.inference import load_predictor, predict, softmax, with_tta

    root, ckpt, onnx = ema_run
    paths = [str(p) for p in sorted(root.rglob("*.jpg"))]
    for tta in ("flip", "five_crop"):
        torch_result = predict(with_tta(load_predictor(ckpt, precision="32"), tta), paths, batch_size=8, num_workers=0)
        onnx_result = predict(with_tta(load_predictor(onnx), tta), paths, batch_size=8, num_workers=0)
        assert [p.path for p in torch_result.predictions] == [p.path for p in onnx_result.predictions]
        assert np.abs(softmax(torch_result.logits) - softmax(onnx_result.logits)).max() < 1e-4, tta
        assert [p.top[0][0] for p in torch_result.predictions] == [p.top[0][0] for p in onnx_result.predictions]


def test_predict_with_tta_on_the_command_line(ema_run, tmp_path):
    root, ckpt, onnx = ema_run
    result = run_module("hymtl.predict", f"ckpt_path={onnx}", f"inputs=[{root}]", "tta=five_crop", "format=json",
                        "num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout)["predictions"]) == 24
    assert "tta=five_crop" in result.stderr


@pytest.mark.slow
def test_eval_reports_tta_beside_the_plain_result(ema_run, tmp_path):
    root, ckpt, onnx = ema_run
    result = run_module("hymtl.eval", f"ckpt_path={ckpt}", f"data.root={root}", "data.num_workers=0", "tta=flip",
                        f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["tta"]["mode"] == "flip" and report["tta"]["num_images"] == report["num_images"]
    assert 0.0 <= report["tta"]["accuracy"] <= 1.0 and "accuracy" in report
    assert any(line.startswith("tta=flip") for line in result.stdout.splitlines()), result.stdout


@pytest.mark.parametrize("module", ["hymtl.predict", "hymtl.eval"])
def test_unknown_tta_is_one_line(module, tiny_checkpoint, tiny_folder, tmp_path):
    extra = [f"inputs=[{tiny_folder}]"] if module == "hymtl.predict" else [f"data.root={tiny_folder}",
                                                                          f"hydra.run.dir={tmp_path / 'e'}"]
    result = run_module(module, f"ckpt_path={tiny_checkpoint}", "tta=abc", *extra, cwd=tmp_path)
    one_error_line(result, "tta must be one of none, flip, five_crop, got abc")


# --------------------------------------------------------------------------- benchmarks/recipes.py
def test_recipes_benchmark_table_counts_wins_per_mode_and_recipe():
    from conftest import load_script

    bench = load_script(REPO_ROOT / "benchmarks" / "recipes.py", "bench_recipes")
    rows = [
        {"folder": "a", "mode": "frozen", "recipe": "baseline", "test_acc": 0.90, "process_s": 10.0},
        {"folder": "a", "mode": "frozen", "recipe": "augment=trivial", "test_acc": 0.92, "process_s": 11.0},
        {"folder": "b", "mode": "frozen", "recipe": "baseline", "test_acc": 0.80},
        {"folder": "b", "mode": "frozen", "recipe": "augment=trivial", "test_acc": 0.70},
        {"folder": "a", "mode": "frozen", "recipe": "tta=flip", "test_acc": 0.95, "plain_acc": 0.93},
        {"folder": "b", "mode": "frozen", "recipe": "callbacks=ema", "error": "boom", "returncode": 1},
    ]
    table = bench.markdown(rows, {"started": "now", "note": "test"})
    assert "| a | frozen | augment=trivial | 0.920 | +0.020 | 11.0 |" in table
    assert "| b | frozen | augment=trivial | 0.700 | -0.100 |" in table
    assert "| a | frozen | tta=flip | 0.950 | +0.020 |" in table  # against eval's own plain accuracy
    assert "| frozen | augment=trivial | 1/2 |" in table and "| frozen | tta=flip | 1/1 |" in table
    assert "| b | frozen | callbacks=ema | — | — |" in table and "failed" in table


def test_a_resume_must_keep_the_recipe_and_the_ema(compose, tmp_path):
    """Resumed with another recipe, or without the EMA a checkpoint was trained with (its
    state_dict is the average: training would go on from it), the run would not be the one
    saved: refused by the resume check, like the other settings of RESUME_MUST_MATCH."""
    from omegaconf import OmegaConf

    from hymtl.resume import setting_differences

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = compose("augment=trivial", "callbacks=ema", "data.root=/x", f"paths.output_dir={run}")
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({k: v for k, v in saved.items() if k != "hydra"}))
    now = compose("data.root=/x", f"paths.output_dir={run}")
    differences = setting_differences(run, now)
    assert any(d.startswith("augment differs") for d in differences), differences
    assert any(d.startswith("callbacks.ema differs") for d in differences), differences
    assert setting_differences(run, compose("augment=trivial", "callbacks=ema", "data.root=/x",
                                            f"paths.output_dir={run}")) == []

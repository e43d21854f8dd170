"""Freezing is real in each regime (partial fine-tuning too); the two-phase switch keeps optimizer
groups correct; a non-finite training loss stops the run before a model is written."""

from __future__ import annotations


import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from torch import nn

from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.errors import HymtlError
from hymtl.features import FeatureBatch, FeatureServer
from hymtl.model import TransferModule

SMALL = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def make_module(unfreeze_at_epoch, **kw) -> TransferModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer", {"_target_": "torch.optim.SGD", "momentum": 0.9})
    kw.setdefault("scheduler", {"_target_": "hymtl.model.constant_schedule"})
    kw.setdefault("pretrained", False)
    return TransferModule(backbone="efficientnet_lite0", num_classes=2, class_names=["ants", "bees"],
                          unfreeze_at_epoch=unfreeze_at_epoch, lr=0.01, **kw)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bn_modes(module: nn.Module) -> set[bool]:
    return {m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def fit(module, folder, epochs, features=None, **trainer_kw):
    dm = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0, preprocessing=SMALL, features=features)
    has_checkpoint = any(isinstance(c, ModelCheckpoint) for c in trainer_kw.get("callbacks", []))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=has_checkpoint,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])}


def test_frozen_trains_only_the_head_and_keeps_batchnorm_in_eval(tiny_folder):
    module = make_module(None)
    head_params = sum(p.numel() for p in module.head.parameters())
    assert count_trainable(module) == head_params == 1280 * 2 + 2
    module.train()
    assert bn_modes(module.backbone) == {False}
    backbone_before, head_before = snapshot(module.backbone), snapshot(module.head)
    fit(module, tiny_folder, epochs=1, limit_val_batches=0)
    assert changed(backbone_before, module.backbone) == set()  # weights and BN running stats
    assert changed(head_before, module.head) == {"1.weight", "1.bias"}
    # frozen parameters are not even in the optimizer
    groups = module.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["head"]


def test_finetune_trains_everything_with_head_at_10x(tiny_folder):
    module = make_module(0)
    assert count_trainable(module) == sum(p.numel() for p in module.parameters())
    before = snapshot(module.backbone)
    trainer = fit(module, tiny_folder, epochs=1, limit_val_batches=0)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["head"]["lr"] == pytest.approx(10 * groups["backbone"]["lr"])
    assert groups["backbone"]["lr"] == pytest.approx(0.01)
    assert "conv_stem.weight" in changed(before, module.backbone)
    assert any(k.endswith("running_mean") for k in changed(before, module.backbone))  # BN in train mode


class RecordPhase(pl.Callback):
    """Trainable-parameter count, BN mode and group learning rates seen in each epoch's first batch."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.seen[trainer.current_epoch] = {
                "trainable": count_trainable(pl_module.backbone),
                "bn_training": bn_modes(pl_module.backbone),
                "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
                "n_groups": len(trainer.optimizers[0].param_groups),
                "optimizer_id": id(trainer.optimizers[0]),
            }


@pytest.mark.slow
def test_two_phase_switch_unfreezes_at_epoch_with_same_optimizer(tiny_folder):
    module = make_module(2, backbone_lr_mult=0.1)
    recorder = RecordPhase()
    fit(module, tiny_folder, epochs=4, limit_val_batches=0, callbacks=[recorder])
    seen = recorder.seen
    for epoch in (0, 1):
        assert seen[epoch]["trainable"] == 0 and seen[epoch]["bn_training"] == {False}
        assert seen[epoch]["lrs"] == {"head": pytest.approx(0.1), "backbone": 0.0}
    for epoch in (2, 3):
        assert seen[epoch]["trainable"] == sum(p.numel() for p in module.backbone.parameters())
        assert seen[epoch]["bn_training"] == {True}
        assert seen[epoch]["lrs"] == {"head": pytest.approx(0.1), "backbone": pytest.approx(0.001)}
    # groups exist from the start; the optimizer object is never replaced
    assert {s["n_groups"] for s in seen.values()} == {2}
    assert len({s["optimizer_id"] for s in seen.values()}) == 1


def test_two_phase_backbone_untouched_in_phase_one(tiny_folder):
    module = make_module(2)
    before = snapshot(module.backbone)
    fit(module, tiny_folder, epochs=2, limit_val_batches=0)
    assert changed(before, module.backbone) == set()
    fit(module, tiny_folder, epochs=2, limit_val_batches=0)  # a fresh trainer starts frozen again
    assert changed(before, module.backbone) == set()


@pytest.mark.slow
def test_resume_after_the_switch_stays_unfrozen(tiny_folder, tmp_path):
    module = make_module(1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(module, tiny_folder, epochs=2, limit_val_batches=0, callbacks=[ckpt])
    resumed = make_module(1)
    recorder = RecordPhase()
    dm = ImageFolderDataModule(root=str(tiny_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[recorder])
    trainer.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert list(recorder.seen) == [2]
    assert recorder.seen[2]["trainable"] > 0 and recorder.seen[2]["bn_training"] == {True}
    assert recorder.seen[2]["lrs"]["backbone"] > 0


def test_invalid_numbers_are_user_errors():
    with pytest.raises(HymtlError):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, lr=-1)
    with pytest.raises(HymtlError):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, unfreeze_at_epoch=-2)
    with pytest.raises(HymtlError):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=1)


def test_checkpoint_hparams_are_plain_and_load_weights_only(tiny_folder, tmp_path):
    module = make_module(0)
    fit(module, tiny_folder, epochs=1, limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)  # nothing but plain data inside
    assert raw["hyper_parameters"]["class_names"] == ["ants", "bees"]
    loaded = TransferModule.load_from_checkpoint(tmp_path / "last.ckpt", pretrained=False, weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    module.eval(), loaded.eval()
    assert torch.allclose(module(x), loaded(x))


# ------------------------------------------------------------------ partial fine-tuning
def stage_state(module: TransferModule, names) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm statistics) of the named backbone stages, by key."""
    wanted = [s for s in module.backbone_stages if s.name in names]
    members = tuple(m for s in wanted for m in s.members)
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()
            if k in members or k.startswith(tuple(m + "." for m in members))}


def prefix_and_top(module: TransferModule):
    top = set(module.trainable_stage_names)
    return [s.name for s in module.backbone_stages if s.name not in top], sorted(top)


def test_partial_trains_only_the_top_stage_and_the_prefix_stays_pretrained_bit_for_bit(tiny_folder):
    """trainable_stages=1 (efficientnet_lite0's last stage, conv_head) with the real ImageNet
    weights: after real optimizer steps every prefix parameter and BatchNorm statistic is the
    pretrained one, the top stage's weights and statistics moved, and only it is in the optimizer."""
    from hymtl.backbones import create_backbone

    module = make_module(0, trainable_stages=1, pretrained=True)
    pretrained = create_backbone("efficientnet_lite0").model.state_dict()
    prefix, top = prefix_and_top(module)
    assert top == ["conv_head"] and prefix[0] == "stem" and len(prefix) == 8
    module.train()
    assert bn_modes(module.backbone.blocks) == {False} and bn_modes(module.backbone.bn2) == {True}
    trainer = fit(module, tiny_folder, epochs=1, limit_val_batches=0)
    assert trainer.global_step == 3  # 12 images, batch 4
    after = module.backbone.state_dict()
    prefix_keys = stage_state(module, prefix)
    assert prefix_keys and all(torch.equal(after[k], pretrained[k]) for k in prefix_keys)
    assert any(k.startswith("blocks.6.") and k.endswith("running_mean") for k in prefix_keys)
    assert not torch.equal(after["conv_head.weight"], pretrained["conv_head.weight"])
    assert not torch.equal(after["bn2.running_mean"], pretrained["bn2.running_mean"])  # top BN trains
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in module.backbone.conv_head.parameters()} | {
        id(p) for p in module.backbone.bn2.parameters()}


def test_partial_registers_only_parameters_that_get_gradients():
    """What DDP registers (parameters with requires_grad when it wraps the model) is exactly the
    head and the top stages, and each gets a gradient in one step: no unused parameters, so
    find_unused_parameters stays off for mode=partial."""
    module = make_module(0, trainable_stages=2)
    _, top = prefix_and_top(module)
    assert top == ["blocks.6", "conv_head"]
    expected = {id(p) for p in module.head.parameters()} | {id(p) for p in module.trainable_backbone_parameters()}
    assert {id(p) for p in module.parameters() if p.requires_grad} == expected
    module.train()
    loss = module.criterion(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert all(p.grad is None for p in module.backbone.blocks[:6].parameters())


class RecordStages(pl.Callback):
    """Per epoch: what the first batch was (features or images), trainable backbone parameters, the
    BatchNorm modes of prefix and top, and the stage states at the end of the epoch."""

    def __init__(self):
        self.seen, self.ends = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.seen[trainer.current_epoch] = {
                "features": isinstance(batch, FeatureBatch),
                "trainable": count_trainable(pl_module.backbone),
                "prefix_bn": bn_modes(pl_module.backbone.blocks[:6]),
                "top_bn": bn_modes(pl_module.backbone.blocks[6]) | bn_modes(pl_module.backbone.bn2),
            }

    def on_train_epoch_end(self, trainer, pl_module):
        prefix, top = prefix_and_top(pl_module)
        self.ends[trainer.current_epoch] = (stage_state(pl_module, prefix), stage_state(pl_module, top))


def test_two_phase_partial_trains_the_head_then_only_the_top_stages(tiny_folder, tmp_path):
    """unfreeze_at_epoch=1 + trainable_stages=2 with the feature serving on: epoch 0 trains the
    head (top stages untouched), from epoch 1 the top stages train while the prefix keeps its
    weights and statistics; every epoch is served the cached activations of the frozen prefix
    (one cache for the whole run: the top stages run on them in the head-only epoch too)."""
    module = make_module(1, trainable_stages=2)
    _, top = prefix_and_top(module)
    prefix_before, top_before = stage_state(module, prefix_and_top(module)[0]), stage_state(module, top)
    features = FeatureServer(precompute=True, enabled=False)
    recorder = RecordStages()
    fit(module, tiny_folder, epochs=3, limit_val_batches=0, callbacks=[recorder], features=features,
        **features.trainer_kwargs(module))
    seen, ends = recorder.seen, recorder.ends
    assert seen[0]["trainable"] == 0
    assert seen[0]["features"] and seen[1]["features"] and seen[2]["features"]
    top_numel = sum(p.numel() for p in module.trainable_backbone_parameters())
    assert seen[1]["trainable"] == seen[2]["trainable"] == top_numel
    assert seen[1]["prefix_bn"] == {False} and seen[1]["top_bn"] == {True}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(ends[0][1], top_before)  # the switch epoch has not come: top stages untouched
    assert not torch.equal(ends[1][1]["conv_head.weight"], top_before["conv_head.weight"])
    assert not torch.equal(ends[2][1]["blocks.6.0.conv_pw.weight"], ends[1][1]["blocks.6.0.conv_pw.weight"])
    for epoch in (0, 1, 2):
        assert same(ends[epoch][0], prefix_before)


@pytest.mark.slow
def test_resumed_two_phase_partial_run_trains_the_same_top_stages(tiny_folder, tmp_path):
    """Resumed after the switch, a two_phase + partial run lands in phase two from
    trainer.current_epoch alone: the top stage trains, the prefix stays frozen and unchanged."""
    module = make_module(1, trainable_stages=1)
    prefix, top = prefix_and_top(module)
    prefix_before = stage_state(module, prefix)
    fit(module, tiny_folder, epochs=2, limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed = make_module(1, trainable_stages=1)
    recorder = RecordPhase()
    dm = ImageFolderDataModule(root=str(tiny_folder), batch_size=4, num_workers=0, preprocessing=SMALL)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert list(recorder.seen) == [2]
    assert recorder.seen[2]["trainable"] == sum(p.numel() for p in resumed.trainable_backbone_parameters()) > 0
    assert bn_modes(resumed.backbone.blocks) == {False}
    prefix_after = stage_state(resumed, prefix)
    assert all(torch.equal(prefix_after[k], prefix_before[k]) for k in prefix_before)
    assert not torch.equal(resumed.backbone.conv_head.weight, module.backbone.conv_head.weight)


@pytest.mark.parametrize("kwargs, message", [
    ({"unfreeze_at_epoch": 0, "trainable_stages": 10},
     "model.trainable_stages must be an integer from 1 to 9 for backbone efficientnet_lite0 (its stages: stem, "
     "blocks.0, blocks.1, blocks.2, blocks.3, blocks.4, blocks.5, blocks.6, conv_head), got 10"),
    ({"unfreeze_at_epoch": 0, "trainable_stages": "top"}, "model.trainable_stages must be an integer"),
    ({"unfreeze_at_epoch": None, "trainable_stages": 2}, "model.trainable_stages=2 with a frozen backbone"),
])
def test_bad_trainable_stages_are_user_errors(kwargs, message):
    with pytest.raises(HymtlError) as info:
        TransferModule(backbone="efficientnet_lite0", pretrained=False, **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.slow
def test_bad_trainable_stages_from_the_command_line_is_one_line_and_exit_2(tiny_folder, tmp_path):
    from test_train import TINY_MODEL, run_train

    result = run_train(*TINY_MODEL, "mode=partial", "mode.trainable_stages=12", "data=folder",
                       f"data.root={tiny_folder}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.trainable_stages must be an integer from 1 to 9 for backbone "
                           "efficientnet_lite0 (its stages: stem, blocks.0"), last


# ------------------------------------------------------------------ non-finite loss
@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_one_line_and_writes_no_model(tiny_folder, tmp_path):
    """lr=1e30: the loss is no longer finite after the first step. The run stops with exit 2 and
    one `error:` line naming the epoch and step, before any checkpoint or metrics.json is written."""
    from test_train import TINY_MODEL, run_train

    result = run_train(*TINY_MODEL, "mode=finetune", "model.lr=1e30", "mode.epochs=2", "data=folder",
                       f"data.root={tiny_folder}", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == result.stderr.strip().splitlines()[-1:]
    assert errors[0].startswith("error: the training loss became ") and "at epoch 0, step " in errors[0]
    assert "lower the learning rate" in errors[0]
    run = tmp_path / "run"
    assert not list(run.glob("checkpoints/*.ckpt")) and not (run / "metrics.json").exists()


class ExplodeAt(pl.Callback):
    """Sets every learning rate to 1e30 from ``epoch`` on: the loss becomes non-finite there."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e30


def test_non_finite_loss_in_a_later_epoch_leaves_the_last_good_epoch_as_last(tiny_folder, tmp_path):
    """Epoch 0 trains normally, epoch 1 blows up: the error names epoch 1 and last.ckpt still
    holds epoch 0 with finite weights (no save after the NaN)."""
    from hymtl.model import NonFiniteLossError

    module = make_module(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(NonFiniteLossError, match="at epoch 1, step "):
        fit(module, tiny_folder, epochs=3, limit_val_batches=0, callbacks=[ckpt, ExplodeAt(1)])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    weights = {k: v for k, v in saved["state_dict"].items() if k.startswith(("backbone.", "head."))}
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

"""Freezing is real in each regime; the two-phase switch keeps optimizer groups correct."""

from __future__ import annotations


import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from torch import nn

from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.errors import HymtlError
from hymtl.model import TransferModule

SMALL = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def make_module(unfreeze_at_epoch, **kw) -> TransferModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer", {"_target_": "torch.optim.SGD", "momentum": 0.9})
    kw.setdefault("scheduler", {"_target_": "hymtl.model.constant_schedule"})
    return TransferModule(backbone="efficientnet_lite0", num_classes=2, class_names=["ants", "bees"],
                          pretrained=False, unfreeze_at_epoch=unfreeze_at_epoch, lr=0.01, **kw)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bn_modes(module: nn.Module) -> set[bool]:
    return {m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def fit(module, folder, epochs, **trainer_kw):
    dm = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0, preprocessing=SMALL)
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

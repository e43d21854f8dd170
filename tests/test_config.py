"""conf/ composes for every regime and backbone; bad overrides are Hydra's errors."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf


@pytest.mark.parametrize(
    "mode, unfreeze",
    [("frozen", None), ("finetune", 0), ("two_phase", 2), ("partial", 0)],
)
def test_modes_drive_the_module(compose, mode, unfreeze):
    cfg = compose(f"mode={mode}")
    assert cfg.model.unfreeze_at_epoch == unfreeze
    assert cfg.model.lr == cfg.mode.lr and cfg.trainer.max_epochs == cfg.mode.epochs
    assert cfg.model._target_ == "hymtl.model.TransferModule"


def test_two_phase_freeze_epochs_is_the_switch(compose):
    cfg = compose("mode=two_phase", "mode.freeze_epochs=5", "mode.epochs=9")
    assert cfg.model.unfreeze_at_epoch == 5 and cfg.trainer.max_epochs == 9


def test_freeze_epochs_is_an_integer(compose):
    from hymtl.config import check_numbers
    from hymtl.errors import HymtlError

    with pytest.raises(HymtlError) as refused:
        check_numbers(compose("mode=two_phase", "mode.freeze_epochs=1.5", "mode.epochs=4"))
    assert str(refused.value) == "mode.freeze_epochs must be an integer, got 1.5"


def test_each_number_rule_lives_once(tmp_path):
    """The objects a config builds check their numbers by the rule of the config check
    (hymtl.config.NUMBER_RULES): the same line whether the number comes from conf/ or the API."""
    from hymtl.config import checked_number
    from hymtl.data import ImageFolderDataModule
    from hymtl.errors import HymtlError
    from hymtl.features import FeatureServer
    from hymtl.model import TransferModule

    def lite0(**kwargs):
        return TransferModule(backbone="efficientnet_lite0", pretrained=False, **kwargs)

    cases = [
        ("mode.feature_views", -1, lambda v: FeatureServer(views=v)),
        ("feature_cache.batch_size", 0, lambda v: FeatureServer(batch_size=v)),
        ("feature_cache.shard_mb", 0, lambda v: FeatureServer(shard_mb=v)),
        ("data.batch_size", 0, lambda v: ImageFolderDataModule(tmp_path, batch_size=v)),
        ("data.num_workers", -2, lambda v: ImageFolderDataModule(tmp_path, num_workers=v)),
        ("data.val_fraction", -0.5, lambda v: ImageFolderDataModule(tmp_path, val_fraction=v)),
        ("data.seed", 1.5, lambda v: ImageFolderDataModule(tmp_path, seed=v)),
        ("model.lr", -1, lambda v: lite0(lr=v)),
        ("model.head_lr_mult", 0, lambda v: lite0(head_lr_mult=v)),
        ("model.backbone_lr_mult", -1, lambda v: lite0(backbone_lr_mult=v)),
        ("model.unfreeze_at_epoch", 1.5, lambda v: lite0(unfreeze_at_epoch=v)),
    ]
    for key, value, build in cases:
        with pytest.raises(HymtlError) as by_rule:
            checked_number(key, value)
        with pytest.raises(HymtlError) as built:
            build(value)
        assert str(built.value) == str(by_rule.value) and str(built.value).startswith(f"{key} "), key


def test_defaults_and_overrides(compose):
    cfg = compose()
    assert cfg.model.backbone == "resnet18" and cfg.mode.name == "auto"
    assert cfg.data._target_ == "hymtl.data.ImageFolderDataModule"
    cfg = compose("model=efficientnet_lite0", "data=folder", "data.root=/x", "seed=3", "model.lr=0.5")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.data.root == "/x" and cfg.data.seed == 3
    assert cfg.model.lr == 0.5  # a direct model override wins over the mode's value


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
                                   "efficientnet_lite2", "timm"])
def test_every_model_config_names_a_registered_backbone(compose, model):
    from hymtl.backbones import get_spec

    cfg = compose(f"model={model}")
    assert get_spec(cfg.model.backbone).name


def test_precision_resolves_for_this_machine(compose):
    from hymtl.runtime import auto_precision

    cfg = compose("trainer=cpu")
    assert cfg.trainer.precision == auto_precision("cpu") in ("bf16-mixed", "32-true")


def test_run_dirs_under_outputs(compose):
    cfg = compose()
    assert cfg.hydra.run.dir.startswith("outputs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")
    assert cfg.hydra.job.chdir is False


def test_unknown_mode_and_key_are_hydra_errors(compose):
    with pytest.raises(ConfigCompositionException, match="frozn"):
        compose("mode=frozn")
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose("model.no_such_key=1")


def test_keys_the_house_removed_are_one_clear_error(compose):
    """The regime's interpolations that became questions to the module (issue 26) are no settings:
    naming one is Hydra's "not in struct" line, not a silently ignored value."""
    for key in ("trainer.strategy.unfreeze_at_epoch", "callbacks.early_stopping.unfreeze_at_epoch"):
        group = "trainer=ddp_cpu" if key.startswith("trainer") else "callbacks=early_stopping"
        with pytest.raises(ConfigCompositionException, match="unfreeze_at_epoch"):
            compose(group, f"{key}=2")


@pytest.mark.parametrize("old, new", [
    ("hymtl.resume.LastCheckpoint", "hymtl.checkpoints.LastCheckpoint"),
    ("hymtl.resume.GracefulStop", "hymtl.checkpoints.GracefulStop"),
    ("hymtl.resume.RNGStateCheckpoint", "hymtl.checkpoints.RNGStateCheckpoint"),
    ("hymtl.resume.AtomicCheckpointIO", "hymtl.checkpoints.AtomicCheckpointIO"),
    ("hymtl.summarize.SweepSummary", "hymtl.summaries.SweepSummary"),
])
def test_targets_that_moved_rooms_keep_their_old_names(old, new):
    """A config written before the rooms were split still instantiates what it names."""
    from hydra.utils import get_class

    assert get_class(old) is get_class(new)


def test_folder_data_requires_root(compose):
    cfg = compose("data=folder")
    assert OmegaConf.is_missing(cfg.data, "root")


@pytest.mark.parametrize("model", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_every_offline_backbone_has_its_weights_after_the_setup(compose, model, monkeypatch):
    """The README lists these as offline: scripts/setup.sh (extra `offline`) installs their weights."""
    from hymtl.backbones import create_backbone

    monkeypatch.setenv("HYMTL_OFFLINE", "1")
    built = create_backbone(compose(f"model={model}").model.backbone, pretrained=True)
    assert built.weights.startswith("imagenet:"), built.weights

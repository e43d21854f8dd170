"""What a composed training config may hold, checked before anything runs, and how its groups
of ``_target_`` entries (callbacks, loggers) become objects.

Hydra types nothing (``mode.epochs=-1`` composes, and Lightning reads it as "train forever"), so
the numbers the user types are checked here, once, with messages that name the key as typed.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hymtl.errors import HymtlError

#: key -> (kind, lower bound, bound is exclusive): the numbers a run's config may hold
NUMBER_RULES: dict[str, tuple[str, float, bool]] = {
    "seed": ("integer", 0, False),
    "mode.epochs": ("integer", 1, False),
    "trainer.max_epochs": ("integer", 1, False),
    "mode.lr": ("number", 0, True),
    "model.lr": ("number", -math.inf, False),  # its sign is the module's check (it names lr and the mults)
    "mode.head_lr_mult": ("number", 0, False),
    "mode.backbone_lr_mult": ("number", 0, False),
    "mode.freeze_epochs": ("number", 0, False),
    "mode.feature_views": ("integer", 0, False),
    "data.val_fraction": ("number", 0, False),
    "data.batch_size": ("integer", 1, False),
    "data.num_workers": ("integer", 0, False),  # or "auto"
    "feature_cache.shard_mb": ("number", 0, True),
    "feature_cache.flush_seconds": ("number", 0, False),
    "callbacks.last_checkpoint.min_interval_s": ("number", 0, False),
}


def checked_number(key: str, value: Any, kind: str = "integer", low: float = 1, exclusive: bool = False) -> Any:
    """``value`` (``"8"`` too) as an ``int`` (``kind="integer"``) or ``float``, at least ``low``
    (above it if ``exclusive``); ``"auto"`` passes for a ``…num_workers`` key. The one rule for the
    numbers a user types, in configs and in the APIs behind the entry points: a
    :class:`HymtlError` naming ``key`` otherwise."""
    if key.endswith("num_workers") and value == "auto":
        return value
    try:
        parsed = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        parsed = math.nan
    if not math.isfinite(parsed) or (kind == "integer" and parsed != int(parsed)):
        raise HymtlError(f"{key} must be {'an integer' if kind == 'integer' else 'a number'}, got {value!r}")
    if parsed < low or (exclusive and parsed == low):
        raise HymtlError(_bound_message(key, value, kind, low, exclusive))
    return int(parsed) if kind == "integer" else parsed


def _bound_message(key: str, value: Any, kind: str, low: float, exclusive: bool) -> str:
    if key.endswith("num_workers"):
        return f"{key} must be 'auto' or an integer >= 0, got {value}"
    if exclusive or low == 1:
        return f"{key} must be a positive {kind}, got {value}"
    return f"{key} must not be negative, got {value}"


def check_numbers(cfg: DictConfig) -> None:
    """Raise :class:`HymtlError` (one line naming the key) for a number of :data:`NUMBER_RULES`
    that is not a number, not an integer where one is needed, or out of range, and for a
    two-phase schedule whose run ends before its switch."""
    for key, (kind, low, exclusive) in NUMBER_RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            checked_number(key, value, kind, low, exclusive)
    start = OmegaConf.select(cfg, "model.unfreeze_at_epoch", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if start and epochs is not None and int(epochs) <= int(start) and not OmegaConf.select(
            cfg, "trainer.fast_dev_run", default=False):
        # it would train the head only to the end and still be labelled two-phase
        raise HymtlError(f"the backbone unfreezes at epoch {start} but the run ends after {epochs} epoch"
                         f"{'s' if int(epochs) != 1 else ''}: set mode.epochs > {start} (or a smaller mode.freeze_epochs)")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a config group (``callbacks``, ``logger``), instantiated."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]

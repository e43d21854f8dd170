"""What a composed training config may hold, checked before anything runs, and how its groups
of ``_target_`` entries (callbacks, loggers) become objects.

Hydra types nothing (``mode.epochs=-1`` composes, and Lightning reads it as "train forever"), so
the numbers the user types are checked here, once, with messages that name the key as typed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hymtl.errors import HymtlError

#: key -> (kind, lower bound, bound is exclusive): the numbers a run's config may hold, each rule
#: once. :func:`check_numbers` applies them to a composed config before anything runs, and the
#: objects those keys configure apply the same rule to what they are given
#: (``checked_number("data.batch_size", batch_size)``), so a rule lives here only.
NUMBER_RULES: dict[str, tuple[str, float, bool]] = {
    "seed": ("integer", 0, False),
    "mode.epochs": ("integer", 1, False),
    "trainer.max_epochs": ("integer", 1, False),
    "mode.lr": ("number", 0, True),
    "model.lr": ("number", 0, True),
    "mode.head_lr_mult": ("number", 0, False),
    "model.head_lr_mult": ("number", 0, True),  # the head always trains: a factor of 0 would freeze it
    "mode.backbone_lr_mult": ("number", 0, False),
    "model.backbone_lr_mult": ("number", 0, False),
    "mode.freeze_epochs": ("integer", 0, False),
    "model.unfreeze_at_epoch": ("integer", 0, False),  # or null: frozen
    "mode.feature_views": ("integer", 0, False),
    "data.val_fraction": ("number", 0, False),
    "data.seed": ("integer", 0, False),
    "data.batch_size": ("integer", 1, False),
    "data.num_workers": ("integer", 0, False),  # or "auto"
    "feature_cache.batch_size": ("integer", 1, False),
    "feature_cache.shard_mb": ("number", 0, True),
    "feature_cache.flush_seconds": ("number", 0, False),
    "callbacks.last_checkpoint.min_interval_s": ("number", 0, False),
    "mode.mixup": ("number", 0, False),  # alphas: 0 = off
    "mode.cutmix": ("number", 0, False),
    "budget": ("duration", 0, True),  # seconds, or 90s / 5m / 1h30m
}

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?")


def checked_number(key: str, value: Any, kind: str | None = None, low: float = 1, exclusive: bool = False) -> Any:
    """``value`` (``"8"`` too) as an ``int`` (``kind="integer"``) or ``float``, at least ``low``
    (above it if ``exclusive``); ``"auto"`` passes for a ``…num_workers`` key. The one rule for the
    numbers a user types, in configs and in the APIs behind the entry points: a
    :class:`HymtlError` naming ``key`` otherwise.

    ``kind=None``: the rule of ``key`` in :data:`NUMBER_RULES` (every key of a training config);
    the settings of other entry points (predict's ``batch_size``, serve's ``port``) give theirs."""
    if kind is None:
        kind, low, exclusive = NUMBER_RULES[key]
    if key.endswith("num_workers") and value == "auto":
        return value
    if kind == "duration":
        return _checked_duration(key, value, low, exclusive)
    try:
        parsed = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        parsed = math.nan
    if not math.isfinite(parsed) or (kind == "integer" and parsed != int(parsed)):
        raise HymtlError(f"{key} must be {'an integer' if kind == 'integer' else 'a number'}, got {value!r}")
    if parsed < low or (exclusive and parsed == low):
        raise HymtlError(_bound_message(key, value, kind, low, exclusive))
    return int(parsed) if kind == "integer" else parsed


def _checked_duration(key: str, value: Any, low: float, exclusive: bool) -> float:
    """Seconds from ``300``, ``"300"``, ``"90s"``, ``"5m"``, ``"1h30m"`` or ``"2.5m"``."""
    text = str(value).strip().lower().replace(" ", "")
    match = _DURATION.fullmatch(text) if text and not isinstance(value, bool) else None
    if match is None or not any(match.groups()):
        raise HymtlError(f"{key} must be a duration: seconds (300) or with a unit (90s, 5m, 1h30m), got {value!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    parsed = hours * 3600 + minutes * 60 + seconds
    if parsed < low or (exclusive and parsed == low):
        raise HymtlError(f"{key} must be a positive duration, got {value!r}")
    return parsed


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
    for key in NUMBER_RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            checked_number(key, value)
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


# --------------------------------------------------------------------------- keys and values of _target_ nodes
def nearest(word: str, candidates: Any, what: str = "valid ones", prefix: str = "") -> str:
    """``did you mean a, b?`` (difflib's close matches of ``word``; every candidate beside them when
    they are few), else every candidate when they are few, else the three nearest: the tail of
    an error line about ``word``. ``prefix``
    goes before each name shown (``data.`` for the keys of ``data``), not into the comparison."""
    import difflib

    candidates = sorted({str(c) for c in candidates})
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    if close:
        listed = f" ({what}: {', '.join(prefix + c for c in candidates)})" if len(candidates) <= 8 else ""
        return f"did you mean {', '.join(prefix + c for c in close)}?{listed}"
    if not candidates:
        return f"there are no {what}"
    if len(candidates) > 8:
        candidates, what = difflib.get_close_matches(word, candidates, n=3, cutoff=0), f"nearest {what}"
    return f"{what}: {', '.join(prefix + c for c in candidates)}"


def _plain_kinds(annotation: Any) -> tuple[Any, ...] | None:
    """The members of ``annotation`` (``Optional``/``Union``/``Literal`` of ``None``, ``bool``,
    ``int``, ``float``, ``str`` and literal values), or ``None`` when it holds anything else."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return tuple(("literal", v) for v in typing.get_args(annotation))
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        kinds: tuple[Any, ...] = ()
        for member in typing.get_args(annotation):
            inner = _plain_kinds(member)
            if inner is None:
                return None
            kinds += inner
        return kinds
    return (annotation,) if annotation in (type(None), bool, int, float, str) else None


def _fits(value: Any, kinds: tuple[Any, ...]) -> bool:
    for kind in kinds:
        if isinstance(kind, tuple):  # ("literal", v)
            if value == kind[1] and type(value) is type(kind[1]):
                return True
        elif kind is type(None) and value is None or kind is bool and isinstance(value, bool):
            return True
        elif kind in (int, float) and not isinstance(value, bool):
            try:  # a number, or text that reads as one (the number rules of check_numbers judge it)
                number = float(value)
            except (TypeError, ValueError):
                continue
            if kind is float or number == int(number):
                return True
        elif kind is str and isinstance(value, str):
            return True
    return False


def _target_nodes(node: DictConfig, path: str = "") -> Any:
    """``(dotted path, node)`` of every node with a ``_target_`` (interpolated nodes are checked
    where they are defined; ``hydra`` is Hydra's)."""
    if "_target_" in node:
        yield path, node
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_missing() \
                and not (path == "" and key == "hydra") and child._is_none() is False:
            yield from _target_nodes(child, f"{path}{key}.")


def check_targets(cfg: DictConfig) -> None:
    """Raise :class:`HymtlError` naming the key for a key of a ``_target_`` node that its target
    does not take (``+data.labels_csv=x``: legal Hydra syntax, and then the data module's
    ``TypeError`` after the file scan), or a value that its target's type annotation rules out
    (``trainer.precision=garbage``: Lightning's ``Literal`` values; ``trainer.max_epochs=abc``),
    with the nearest valid keys or values. Targets that cannot be imported or inspected are left
    to ``instantiate``; a target that takes ``**kwargs`` takes any key."""
    import inspect
    import typing

    from hydra.utils import get_object

    for path, node in _target_nodes(cfg):
        target_name = node._get_node("_target_")._value()
        try:
            target = get_object(str(target_name))
            signature = inspect.signature(target)
        except Exception:  # noqa: BLE001 - instantiate reports a target that cannot be had
            continue
        parameters = {name: p for name, p in signature.parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        try:
            hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
        except Exception:  # noqa: BLE001 - unresolvable annotations: keys are still checked
            hints = {}
        for key in node.keys():
            key = str(key)
            if key.startswith("_") and key.endswith("_"):
                continue  # _target_, _recursive_, _partial_…: Hydra's
            if key not in parameters:
                if not takes_any:
                    raise HymtlError(f"{path}{key} is not a setting of {target_name}; "
                                     f"{nearest(key, parameters, 'settings', prefix=path)}")
                continue
            kinds = _plain_kinds(hints[key]) if key in hints else None
            if kinds is None:
                continue
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 - an interpolation that fails is reported where it is used
                continue
            if value is not None and not _fits(value, kinds):  # null: the task may fill it in (eval's data.root)
                raise HymtlError(_value_message(f"{path}{key}", value, kinds))


def _value_message(key: str, value: Any, kinds: tuple[Any, ...]) -> str:
    literals = [str(kind[1]) for kind in kinds if isinstance(kind, tuple)]
    names = [{type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "text"}[kind]
             for kind in kinds if not isinstance(kind, tuple)]
    if literals:
        return f"{key}={value} is not a valid value; {nearest(str(value), literals, 'valid values')}" + (
            f" (or {', '.join(names)})" if names else "")
    return f"{key} must be {' or '.join(names)}, got {value!r}"

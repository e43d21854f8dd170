"""What may be resumed: a resumed run continues the run it names, with the same settings.

* :func:`check_resume` — a whole checkpoint (read by :mod:`hymtl.loading`, its description
  verified against its tensors by :func:`hymtl.model.verified_module_kwargs`) of the same run
  settings (:data:`RESUME_MUST_MATCH`), refused with one line before the run folder is touched;
* :func:`check_resumable_classes` — the classes the scan found are the checkpoint's;
* :func:`check_resume_in_place` — the same check before Hydra writes into a used run folder.

Which checkpoint ``ckpt_path`` names and which folder the resumed run writes to is the run
folder's room (:func:`hymtl.runs.resolve_resume`, :func:`hymtl.runs.continue_run`); how
checkpoints are written, :mod:`hymtl.checkpoints`; signals, :mod:`hymtl.signals`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from hymtl.errors import HymtlError, printable
from hymtl.loading import MAX_QUOTED, LoadError, read_checkpoint
from hymtl.runs import Resume, launch_dir, resolve_resume, saved_config


def check_resume_in_place(config: DictConfig, run_dir: Path) -> None:
    """Before Hydra writes a training run's config into ``run_dir``: a resume *in* that used run
    folder (``hydra.run.dir=<run> ckpt_path=last``) must pass :func:`check_resume` first, so a
    refused resume leaves the run's own record of its settings; one line and exit 2 otherwise.
    Given to :class:`hymtl.runs.RunDirCheck` by ``conf/hydra/default.yaml``."""
    ckpt_path = OmegaConf.select(config, "ckpt_path", default=None)
    if not ckpt_path or OmegaConf.select(config, "hydra.job.name", default=None) != "train" \
            or saved_config(run_dir) is None:
        return
    try:
        resume = resolve_resume(ckpt_path, run_dir, Path(str(OmegaConf.select(config, "paths.log_dir"))))
        check_resume(resume, config)
    except HymtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


#: What a resumed run must share with the run it continues, compared between the run's saved
#: ``.hydra/config.yaml`` (resolved) and the resuming command's config: every setting that
#: changes what the run's metrics mean. The class names are compared with the checkpoint's
#: (:func:`check_resumable_classes`): they are known only once the folders are scanned.
RESUME_MUST_MATCH: tuple[str, ...] = (
    "data.root",                 # the images (a relative root: relative to the folder launched from)
    "data.val_fraction",         # the val split of a flat folder ...
    "data.seed",                 # ... its seed (also the augmentation seed of the cached views)
    "data.extensions",           # which files are images
    "data.preprocessing",        # image size and normalisation (default: the backbone's)
    "model.backbone",            # the network and its preprocessing
    "model.label_smoothing",     # what train/val loss measure
    "mode.name",                 # the regime ...
    "model.unfreeze_at_epoch",
    "model.trainable_stages",
    "model.depth_search.step_epochs",  # the depth search's steps (its budget may change: a ceiling)
    "model.depth_search.head_epochs",
    "model.depth_search.margin",
    "model.depth_search.first_cut",
    "model.mixup",               # mixup / cutmix change what train/loss measures
    "model.cutmix",
    "mode.precompute_features",  # ... and what the head trains on: cached features and their views
    "mode.feature_views",
    "augment",                   # the training augmentation (and what the cached augmented views are)
    "callbacks.ema",             # an EMA checkpoint's state_dict is the average: resumed without the
                                 # callback, training would go on from the average, not its own weights
)
_ABSENT = object()


def check_resume(resume: Resume, cfg: DictConfig) -> dict[str, Any]:
    """What may be resumed: ``resume.checkpoint`` must be a whole hymtl checkpoint (read by
    :func:`hymtl.loading.read_checkpoint`, the checks of eval/predict/export) of the same backbone
    and regime, and the run it belongs to must have been run with the same
    :data:`RESUME_MUST_MATCH` settings as ``cfg``. Otherwise one :class:`HymtlError` line that
    names every difference (``data.root differs (was X, now Y)``) — raised before the run folder
    is touched. Returns the checkpoint's hyperparameters."""
    # the model's room builds what a checkpoint describes; imported here, not above: Hydra loads
    # this module (check_resume_in_place) before every run of every entry point
    from hymtl.model import verified_module_kwargs

    where = printable(str(resume.checkpoint))
    try:
        checkpoint = read_checkpoint(resume.checkpoint)
        # its description against its tensors, and finite weights: a damaged file is named as such
        # here, not found later as a shape mismatch or a "non-finite loss: lower the learning rate"
        verified_module_kwargs(checkpoint, resume.checkpoint)
    except LoadError as exc:
        raise HymtlError(f"cannot resume {where}: {exc}") from None
    differences = setting_differences(resume.run_dir, cfg)
    hp = checkpoint["hyper_parameters"]
    for key, name in (("model.backbone", "backbone"), ("model.unfreeze_at_epoch", "unfreeze_at_epoch")):
        now = OmegaConf.select(cfg, key, default=None)
        if name in hp and hp[name] != now and not any(d.startswith(f"{key} ") for d in differences):
            differences.append(f"{key} differs (the checkpoint's: {printable(repr(hp[name]))}, now {printable(repr(now))})")
    if differences:
        raise HymtlError(f"cannot resume {where}: " + "; ".join(differences)
                         + " (a resume must run with its run's settings; start a new run to change them)")
    return hp


def setting_differences(run_dir: Path | None, cfg: DictConfig) -> list[str]:
    """``"<key> differs (was X, now Y)"`` for each :data:`RESUME_MUST_MATCH` key whose value in
    ``<run_dir>/.hydra/config.yaml`` differs from ``cfg``'s (none for a checkpoint outside a run
    folder, or keys an older run did not save)."""
    saved = saved_config(run_dir)
    if saved is None:
        return []
    launched = launch_dir(run_dir)
    differences = []
    for key in RESUME_MUST_MATCH:
        was = _setting(saved, key, launched)
        if was is _ABSENT:
            continue
        now = _setting(cfg, key, Path.cwd())
        now = None if now is _ABSENT else now
        if was != now:
            differences.append(f"{key} differs (was {printable(_shown(was))}, now {printable(_shown(now))})")
    return differences


def _setting(config: DictConfig, key: str, launched: Path | None) -> Any:
    try:
        value = OmegaConf.select(config, key, default=_ABSENT, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - e.g. a resolver an older hymtl had: nothing to compare
        return _ABSENT
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if key == "data.root" and value not in (None, _ABSENT):
        root = Path(os.path.expanduser(str(value)))
        if not root.is_absolute() and launched is not None:
            root = launched / root
        value = os.path.normpath(root.absolute())
    return value


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def check_resumable_classes(path: Path, hparams: dict[str, Any], class_names: list[str]) -> None:
    """The class names found by the scan must be those of the checkpoint (``hparams``, from
    :func:`check_resume`): one line, not a shape-mismatch traceback, when the folder now holds
    other classes."""
    saved = hparams.get("class_names")
    if saved is not None and list(saved) != list(class_names):
        raise HymtlError(f"cannot resume {printable(str(path))}: class names differ (was {_names(saved)}, "
                         f"now {_names(class_names)})")


def _names(names) -> str:
    """A list of class names for one error line: whole when short, else its start and its count."""
    shown = printable(repr(list(names)))
    return shown if len(shown) <= MAX_QUOTED else f"{shown[:MAX_QUOTED]}… ({len(names)} names)"


#: the callbacks and checkpoint IO that moved to :mod:`hymtl.checkpoints`: a config or script that
#: still names ``hymtl.resume.LastCheckpoint`` (their home until the rooms were split) gets them
_MOVED_TO_CHECKPOINTS = frozenset({"AtomicCheckpointIO", "GracefulStop", "LastCheckpoint", "RNGStateCheckpoint"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_CHECKPOINTS:
        import hymtl.checkpoints

        return getattr(hymtl.checkpoints, name)
    raise AttributeError(f"module 'hymtl.resume' has no attribute {name!r}")

"""Train, then test the best checkpoint: ``python -m hymtl.train mode=frozen model=efficientnet_lite0``.

Writes one Hydra run folder (``outputs/<date>/<time>/``, or ``outputs/multirun/…/<n>/``):
``.hydra/`` (the composed config), ``checkpoints/`` (best by val accuracy + last),
``tensorboard/``, ``metrics.json``; prints the test metrics and the tutorial's two lines.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hymtl.callbacks import HParamsLogger, ThroughputMonitor, print_tutorial_lines
from hymtl.checkpointing import RunInterrupted, check_resumable, resolve_resume
from hymtl.data import SKIPPED_FILE_NAME, read_skipped, summarize_skipped
from hymtl.distributed import rank_failure_message
from hymtl.errors import HymtlError
from hymtl.features import FeatureExtractor
from hymtl.fileio import atomic_write_json
from hymtl.runtime import config_dir, configure_backends, device_name

log = logging.getLogger("hymtl.train")


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(entry) for entry in cfg.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def _override_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The command line's overrides as HParams columns (``mode.lr`` -> its resolved value):
    whatever a sweep varies is then comparable in TensorBoard. Groups (``mode=frozen``) are
    represented by the scalar keys of the curated list in conf/callbacks/default.yaml."""
    if not HydraConfig.initialized():
        return {}
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    columns = {}
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra"):
            continue
        absent = object()  # experiment=…, hparams_search=…: global groups with no key of their own
        value = OmegaConf.select(cfg, key, default=absent)
        if value is None or isinstance(value, (bool, int, float, str)):
            columns[key] = value
    return columns


def _epochs_from_last_checkpoint(trainer: pl.Trainer) -> int:
    """Epochs completed, from ``last.ckpt``: a DDP-spawn fit leaves ``trainer.current_epoch`` at 0
    in the main process."""
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
    if last is None or not last.is_file():
        return trainer.current_epoch
    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; return the final metrics (also written to metrics.json)."""
    started = time.perf_counter()
    check_numbers(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resume = resolve_resume(cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir))
    if resume is not None and resume.run_dir is not None and resume.run_dir.resolve() != output_dir.resolve():
        # one run, one folder: the best checkpoint so far, the curves and metrics.json stay together
        log.info("resuming %s: writing to its run folder %s", resume.checkpoint, resume.run_dir)
        cfg.paths.output_dir = str(resume.run_dir)
        output_dir = resume.run_dir
    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()

    datamodule = instantiate(cfg.data)
    if getattr(datamodule, "skipped_file", "") is None:
        datamodule.skipped_file = output_dir / SKIPPED_FILE_NAME
    datamodule.prepare_data()  # download if missing: the class names are needed to build the head
    class_names = datamodule.class_names
    model = instantiate(cfg.model, num_classes=len(class_names), class_names=class_names)
    if resume is not None:
        check_resumable(resume.checkpoint, cfg.model.backbone, class_names, cfg.model.get("unfreeze_at_epoch"))
    datamodule.preprocessing = model.preprocessing
    log.info("classes %s; backbone %s (%s)", class_names, cfg.model.backbone, model.weights_source)
    if datamodule.test_split_name == "val":
        log.info("no test/ folder in %s: the val split doubles as the test split", datamodule.root)

    callbacks = _instantiate_group(cfg.get("callbacks"))
    for callback in callbacks:
        if isinstance(callback, HParamsLogger):
            callback.hparams.update(_override_hparams(cfg))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                                      **_serve_cached_features(cfg, model, datamodule))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    logged_throughput = metrics.pop("train/examples_per_sec", None)
    metrics.update(
        {
            # DDP spawn (multirun): the fit ran in child processes; only callback_metrics came back
            "examples_per_sec": (throughput.examples_per_sec if throughput and throughput.seconds
                                 else logged_throughput),
            "epochs": trainer.current_epoch or _epochs_from_last_checkpoint(trainer),
            "wall_time_s": time.perf_counter() - started,
            "mode": cfg.mode.name,
            "backbone": cfg.model.backbone,
            "class_names": class_names,
            "test_split": datamodule.test_split_name,
            "best_checkpoint": best or None,
            "device": device_name(trainer),
        }
    )
    skipped = read_skipped(output_dir / SKIPPED_FILE_NAME)  # the up-front check + decode failures in workers
    metrics["skipped_files"] = len(skipped)
    if skipped:
        log.warning("%s (list in %s)", summarize_skipped(skipped), output_dir / SKIPPED_FILE_NAME)
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
    if "test/acc" in metrics and "train/loss" in metrics:
        print_tutorial_lines(
            metrics["train/loss"], metrics.get("train/acc", float("nan")), metrics["test/acc"],
            metrics["examples_per_sec"] or 0.0, metrics["device"],
        )
    return metrics


def _serve_cached_features(cfg: DictConfig, model, datamodule) -> dict[str, Any]:
    """While the backbone is frozen (``mode=frozen``; the head-only epochs of ``two_phase``),
    train the head on backbone features computed once and kept in the feature cache
    (``mode.precompute_features``, ``mode.feature_views``, ``feature_cache.*``).
    Returns the extra Trainer arguments this needs (two-phase: new dataloaders at the switch)."""
    until = cfg.mode.get("unfreeze_at_epoch")
    if not cfg.mode.get("precompute_features", False) or until == 0:
        return {}
    cache = cfg.get("feature_cache") or {}
    precision = str(cfg.trainer.get("precision", "32-true"))
    extractor = FeatureExtractor(
        model.backbone,
        name=cfg.model.backbone,
        cache_dir=(cache.get("dir") or None) if cache.get("enabled", True) else False,
        device="cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda") else "cpu",
        batch_size=int(cache.get("batch_size", 64)),
        num_workers=datamodule.num_workers,
        # the numerics of the uncached path: features as the Trainer's precision would compute them
        autocast_dtype=torch.bfloat16 if precision.startswith("bf16") else (torch.float16 if precision.startswith("16") else None),
        channels_last=bool(cfg.model.get("channels_last", True)),
    )
    datamodule.serve_features(extractor, num_views=int(cfg.mode.get("feature_views", 0)), until_epoch=until)
    log.info("head-only epochs train on cached backbone features (%s)",
             extractor.cache_root or "in memory: feature_cache.enabled=false")
    return {"reload_dataloaders_every_n_epochs": until} if until else {}


def check_numbers(cfg: DictConfig) -> None:
    """Numbers Lightning or PyTorch would take silently or end in a traceback: one line instead
    (``mode.epochs=-1`` would mean "train forever" to Lightning)."""
    def number(key: str, value: Any, integer: bool = False) -> float:
        try:
            parsed = float(value)
        except (TypeError, ValueError):
            parsed = float("nan")
        if parsed != parsed or parsed in (float("inf"), float("-inf")) or (integer and parsed != int(parsed)):
            raise HymtlError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        return parsed

    for key in ("mode.epochs", "trainer.max_epochs"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and number(key, value, integer=True) < 1:
            raise HymtlError(f"{key} must be a positive integer, got {value}")
    value = OmegaConf.select(cfg, "mode.lr", default=None)
    if value is not None and number("mode.lr", value) <= 0:
        raise HymtlError(f"mode.lr must be a positive number, got {value}")
    if OmegaConf.select(cfg, "model.lr", default=None) is not None:
        number("model.lr", cfg.model.lr)  # its sign is the module's check
    for key in ("mode.head_lr_mult", "mode.backbone_lr_mult", "mode.freeze_epochs", "data.val_fraction"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and number(key, value) < 0:
            raise HymtlError(f"{key} must not be negative, got {value}")
    value = OmegaConf.select(cfg, "data.num_workers", default=None)
    if value not in (None, "auto") and number("data.num_workers", value, integer=True) < 0:
        raise HymtlError(f"data.num_workers must be 'auto' or an integer >= 0, got {value}")
    value = OmegaConf.select(cfg, "data.batch_size", default=None)
    if value is not None and number("data.batch_size", value, integer=True) < 1:
        raise HymtlError(f"data.batch_size must be a positive integer, got {value}")


def _user_error(exc: BaseException) -> HymtlError | None:
    """The HymtlError behind ``exc`` (Hydra's instantiate wraps the errors of constructors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HymtlError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg: DictConfig, exc: BaseException, user_error: HymtlError | None) -> None:
    """Report a failed run of a sweep on the console and as ``error.json`` in its run folder
    (which ``hymtl.summarize`` lists as failed)."""
    root = exc
    for _ in range(16):  # Hydra's InstantiationException wraps the real error (bounded: no cycles)
        if root.__cause__ is None:
            break
        root = root.__cause__
    message = str(user_error) if user_error is not None else f"{type(root).__name__}: {root}"
    if user_error is None:  # a bug or an environment problem: the traceback is the report
        log.exception("run failed: %s", message)
    else:
        log.error("run failed: %s", message)
    try:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        atomic_write_json(output_dir / "error.json", {
            "error": message.splitlines()[0] if message else type(exc).__name__,
            "type": type(user_error or root).__name__,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        })
    except Exception:  # noqa: BLE001 - never let the report of one failure end the sweep
        log.exception("could not write error.json")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics = train(cfg)
    except RunInterrupted as stop:  # Ctrl-C / SIGTERM: state saved; a sweep stops as a whole
        print(stop.message, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except Exception as exc:
        error = _user_error(exc)
        if _is_multirun():  # any failure of one run is reported and recorded; the others go on
            _record_failure(cfg, exc, error)
            return float("nan")
        failure = rank_failure_message(exc) if error is None else None
        if failure is not None:  # a DDP rank died or stopped answering: one line, not gloo's/NCCL's traceback
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(1)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()

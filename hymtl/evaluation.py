"""Scoring a checkpoint on labelled data: what ``hymtl.eval`` runs.

* Which images: without ``data.*`` the data the checkpoint was trained on, and there its test
  split (its ``test/``, else its validation split — said in the report); given another folder,
  label file or Parquet data, **every** image of it, whatever its layout (flat ``<class>/``,
  ``test/`` or ``val/`` only, ``train/val/test``): a held-out set is scored whole.
* ``tta=flip|five_crop``: the accuracy with test-time augmentation beside the plain result.
* Labels are read by name into the checkpoint's classes; images of classes the model does not
  know are left out and said once.
* The report (:class:`hymtl.callbacks.ClassificationReport`): per class precision, recall, F1,
  support, macro averages, accuracy and the confusion matrix — or, for a multi-label model, per
  label precision, recall, F1, average precision and threshold, micro/macro F1, mAP, exact match.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hymtl.errors import HymtlError, printable

log = logging.getLogger("hymtl.eval")

#: the ``data.*`` keys that say where data is, per source (folder, label file, Parquet)
LOCATION_KEYS = ("root", "file", "files")


class EvalError(HymtlError):
    """The checkpoint or the data cannot be evaluated."""


def load_checkpoint(ckpt_path: str | os.PathLike):
    """The module of a checkpoint via :func:`hymtl.model.load_checkpoint` (read by
    :mod:`hymtl.loading`, ``weights_only``: no code from the file runs); its errors as one-line
    :class:`EvalError`."""
    from hymtl.loading import LoadError
    from hymtl.model import load_checkpoint as load_module

    try:
        return load_module(ckpt_path)
    except LoadError as exc:
        raise EvalError(str(exc)) from None


def data_to_score(data_cfg: DictConfig, ckpt_path: str) -> tuple[DictConfig, bool]:
    """The data config to score and whether every image of it is scored (``whole``): the
    training data's test split when no location is given or the one given is the training
    folder; every image of any other data."""
    from hymtl.runs import trained_data_root

    given = {key: data_cfg.get(key) for key in LOCATION_KEYS if data_cfg.get(key) not in (None, "")}
    trained = trained_data_root(ckpt_path)
    if not given:
        if trained is None:
            raise EvalError(f"no data.root given and the run of {printable(ckpt_path)} names none: pass "
                            "data.root=FOLDER (or data=table data.file=LABELS.csv, data=parquet data.files=…)")
        log.info("no data given: the checkpoint's training folder %s, its test split", printable(trained))
        return OmegaConf.merge(data_cfg, {"root": str(trained)}), False
    root = given.get("root")
    same = trained is not None and root is not None and Path(os.path.expanduser(str(root))).resolve() == trained.resolve()
    if same:
        log.info("%s is the checkpoint's training folder: scoring its test split", printable(root))
    return data_cfg, not same


def format_report(result: dict[str, Any]) -> str:
    """The printed table of :func:`evaluate`'s result (multi-class or multi-label)."""
    header = [f"checkpoint  {printable(result['checkpoint'])}",
              f"data        {printable(result['data_root'])} (split {result['split']}, {result['num_images']} images)", ""]
    body = _multilabel_table(result) if result.get("task") == "multilabel" else _multiclass_table(result)
    return "\n".join(header + body)


def _multiclass_table(result: dict[str, Any]) -> list[str]:
    from hymtl.figures import MAX_HEATMAP_CLASSES

    names = result["class_names"]
    width = max(10, *(len(printable(n)) for n in names)) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
    for name in names:
        row = result["per_class"][name]
        lines.append(f"{printable(name):<{width}}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}"
                     f"{row['support']:>9d}")
    macro = result["macro"]
    lines.append(f"{'macro avg':<{width}}{macro['precision']:>10.3f}{macro['recall']:>8.3f}{macro['f1']:>8.3f}"
                 f"{macro['support']:>9d}")
    lines.append(f"{'accuracy':<{width}}{'':>18}{result['accuracy']:>8.3f}{result['num_images']:>9d}")
    if result.get("tta"):
        tta = result["tta"]
        lines.append(f"{'tta=' + tta['mode']:<{width}}{'':>18}{tta['accuracy']:>8.3f}{tta['num_images']:>9d}"
                     f"  (accuracy with test-time augmentation; macro {tta['accuracy_macro']:.3f})")
    if result.get("loss") is not None:
        lines.append(f"{'loss':<{width}}{'':>18}{result['loss']:>8.3f}")
    if len(names) <= MAX_HEATMAP_CLASSES:
        cell = max(6, *(len(printable(n)) + 1 for n in names))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * width + "".join(f"{printable(n):>{cell}}" for n in names)]
        for name, row in zip(names, result["confusion_matrix"]):
            lines.append(f"{printable(name):<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    else:  # a 1000x1000 table helps nobody on a console: the most frequent mistakes instead
        lines += ["", f"most confused pairs (true -> predicted; the full {len(names)}x{len(names)} matrix is in eval.json)"]
        for pair in result.get("confused_pairs", []):
            lines.append(f"  {pair['true']} -> {pair['predicted']}  {pair['count']}")
    return lines


def _multilabel_table(result: dict[str, Any]) -> list[str]:
    names = result["class_names"]
    width = max(10, *(len(printable(n)) for n in names)) + 2
    lines = [f"{'label':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'AP':>8}{'threshold':>11}{'support':>9}"]
    for name in names:
        row = result["per_label"][name]
        lines.append(f"{printable(name):<{width}}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}"
                     f"{row['average_precision']:>8.3f}{row['threshold']:>11.3f}{row['support']:>9d}")
    lines += ["", f"{'f1 micro':<{width}}{result['f1_micro']:>10.3f}   (every decision counted once)",
              f"{'f1 macro':<{width}}{result['f1_macro']:>10.3f}   (the mean of the per-label F1)",
              f"{'mAP':<{width}}{result['map']:>10.3f}   (the mean average precision: threshold-free ranking)",
              f"{'exact match':<{width}}{result['exact_match']:>10.3f}   (images whose whole label set is right)"]
    if result.get("loss") is not None:
        lines.append(f"{'loss':<{width}}{result['loss']:>10.3f}")
    return lines


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.data``; write ``eval.json`` into the run dir; return the result."""
    if not cfg.get("ckpt_path"):
        raise EvalError("no checkpoint given: python -m hymtl.eval ckpt_path=PATH [data.root=FOLDER]")
    import lightning.pytorch as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from hymtl.callbacks import ClassificationReport
    from hymtl.fileio import atomic_write_json
    from hymtl.inference import checked_tta
    from hymtl.runtime import configure_backends, device_name

    tta = checked_tta(cfg.get("tta"))
    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()
    model = load_checkpoint(cfg.ckpt_path)
    if tta != "none" and model.task.multilabel:
        raise EvalError("tta in hymtl.eval reports accuracy, for one label per image; a multi-label model takes "
                        "tta in hymtl.predict")
    data_cfg, whole = data_to_score(cfg.data, str(cfg.ckpt_path))
    # prepared as the checkpoint's model expects (its saved preprocessing, not the registry's), labels by its names
    datamodule = instantiate(data_cfg, preprocessing=model.preprocessing.as_dict(), whole=whole,
                             class_names=model.class_names, multilabel=model.task.multilabel)
    datamodule.prepare_data()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    report = next((c for c in callbacks if isinstance(c, ClassificationReport)), None)
    if report is None:
        report = ClassificationReport()
        callbacks.append(report)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    result = {
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "data_root": str(Path(datamodule.location).resolve()) if datamodule.source.name == "data=folder"
        else datamodule.location,
        "split": datamodule.test_split_name,
        "backbone": model.hparams.backbone,
        "device": device_name(trainer),
        "loss": float(tested["test/loss"]) if "test/loss" in tested else None,
        "score": model.task.metric,
        **report.report,
    }
    result["score_value"] = _score(result, model.task.metric)
    if tta != "none" and trainer.is_global_zero:  # beside the plain result: same model and images, views averaged
        result["tta"] = _tta_accuracy(model, cfg.ckpt_path, tta, datamodule)
    if trainer.is_global_zero:
        output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")
        result["output"] = str(output_dir / "eval.json")
        atomic_write_json(output_dir / "eval.json", result)
        print(format_report(result), flush=True)
        print(f"\nsaved {printable(result['output'])}", flush=True)
    return result


def _tta_accuracy(model, ckpt_path: str, tta: str, datamodule) -> dict[str, Any]:
    """Accuracy (and macro) of ``model`` with test-time augmentation ``tta`` on the scored images."""
    from hymtl.inference import TorchPredictor, accuracy_on, with_tta

    predictor = with_tta(TorchPredictor(model, source=str(ckpt_path), precision="auto"), tta)
    samples = datamodule.test_samples
    return {"mode": tta, **accuracy_on(predictor, list(samples), [s.label for s in samples],
                                        datamodule.batch_size, datamodule.num_workers)}


def _score(result: dict[str, Any], metric: str) -> float | None:
    """The task's metric in the report (``acc_macro``: the mean per-class recall)."""
    if metric == "acc":
        return result.get("accuracy")
    if metric == "acc_macro":
        return (result.get("macro") or {}).get("recall")
    return result.get(metric)

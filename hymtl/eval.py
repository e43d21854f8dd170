"""Evaluate a checkpoint on a folder of images: ``python -m hymtl.eval ckpt_path=PATH [data.root=FOLDER]``.

Runs ``trainer.test`` on the folder's test split (its ``test/``, else its validation split) and
reports accuracy, per-class precision / recall / F1 / support, their macro averages and the
confusion matrix (torchmetrics, see :class:`hymtl.callbacks.ClassificationReport`), printed as a
table and saved as ``eval.json`` — with the test figures — in ``<run>/eval/<date>_<time>/``,
where ``<run>`` is the training run the checkpoint belongs to. Without ``data.root`` the folder
the checkpoint was trained on (its run's ``.hydra/config.yaml``) is used.

The checkpoint is read with ``weights_only=True`` (no code from the file runs; a TorchScript
program is refused whatever its name: :func:`hymtl.loading.read_checkpoint`); a folder whose
classes differ from the checkpoint's is refused with one line. Paths in the printed report go
through :func:`hymtl.errors.printable`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from hymtl.cli import run_entry
from hymtl.errors import HymtlError, printable
from hymtl.runtime import config_dir

if TYPE_CHECKING:
    from hymtl.model import TransferModule

log = logging.getLogger("hymtl.eval")


class EvalError(HymtlError):
    """The checkpoint or the folder cannot be evaluated."""


def load_checkpoint(ckpt_path: str | os.PathLike) -> TransferModule:
    """The module of a checkpoint via :func:`hymtl.loading.load_checkpoint` (CRC-checked,
    ``weights_only``: no code from the file runs); its errors as one-line :class:`EvalError`."""
    from hymtl import loading

    try:
        return loading.load_checkpoint(ckpt_path)
    except loading.LoadError as exc:
        raise EvalError(str(exc)) from None


def format_report(result: dict[str, Any]) -> str:
    """The printed table: per class, macro average, accuracy, loss, confusion matrix (or, for
    more classes than a heat map shows, the most confused pairs)."""
    from hymtl.figures import MAX_HEATMAP_CLASSES
    names = result["class_names"]
    width = max(10, *(len(n) for n in names)) + 2
    lines = [
        f"checkpoint  {printable(result['checkpoint'])}",
        f"data        {printable(result['data_root'])} (split {result['split']}, {result['num_images']} images)",
        "",
        f"{'class':<{width}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}",
    ]
    for name in names:
        row = result["per_class"][name]
        lines.append(f"{name:<{width}}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}{row['support']:>9d}")
    macro = result["macro"]
    lines.append(f"{'macro avg':<{width}}{macro['precision']:>10.3f}{macro['recall']:>8.3f}{macro['f1']:>8.3f}{macro['support']:>9d}")
    lines.append(f"{'accuracy':<{width}}{'':>18}{result['accuracy']:>8.3f}{result['num_images']:>9d}")
    if result.get("loss") is not None:
        lines.append(f"{'loss':<{width}}{'':>18}{result['loss']:>8.3f}")
    if len(names) <= MAX_HEATMAP_CLASSES:
        cell = max(6, *(len(n) + 1 for n in names))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * width + "".join(f"{n:>{cell}}" for n in names)]
        for name, row in zip(names, result["confusion_matrix"]):
            lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    else:  # a 1000x1000 table helps nobody on a console: the most frequent mistakes instead
        lines += ["", f"most confused pairs (true -> predicted; the full {len(names)}x{len(names)} matrix is in eval.json)"]
        for pair in result.get("confused_pairs", []):
            lines.append(f"  {pair['true']} -> {pair['predicted']}  {pair['count']}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.data``; write ``eval.json`` into the run dir; return the result."""
    if not cfg.get("ckpt_path"):
        raise EvalError("no checkpoint given: python -m hymtl.eval ckpt_path=PATH [data.root=FOLDER]")
    import lightning.pytorch as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from hymtl.callbacks import ClassificationReport
    from hymtl.fileio import atomic_write_json
    from hymtl.runs import trained_data_root
    from hymtl.runtime import configure_backends, device_name

    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()
    model = load_checkpoint(cfg.ckpt_path)

    data_cfg = cfg.data
    if data_cfg.get("root") is None:
        root = trained_data_root(cfg.ckpt_path)
        if root is None:
            raise EvalError(f"no data.root given and the run of {cfg.ckpt_path} names none: pass data.root=FOLDER")
        log.info("data.root not given: using the checkpoint's training folder %s", root)
        data_cfg = OmegaConf.merge(data_cfg, {"root": str(root)})
    # prepared as the checkpoint's model expects (its saved preprocessing, not the registry's)
    datamodule = instantiate(data_cfg, preprocessing=model.preprocessing.as_dict())
    datamodule.prepare_data()
    if datamodule.class_names != model.class_names:
        raise EvalError(
            f"the classes of {datamodule.root} {datamodule.class_names} do not match "
            f"the checkpoint's {model.class_names}"
        )

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    report = next((c for c in callbacks if isinstance(c, ClassificationReport)), None)
    if report is None:
        report = ClassificationReport()
        callbacks.append(report)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]

    result = {
        "checkpoint": str(Path(cfg.ckpt_path).expanduser().resolve()),
        "data_root": str(datamodule.root.resolve()),
        "split": datamodule.test_split_name,
        "backbone": model.hparams.backbone,
        "device": device_name(trainer),
        "loss": float(tested["test/loss"]) if "test/loss" in tested else None,
        **report.report,
    }
    if trainer.is_global_zero:
        output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(".")
        result["output"] = str(output_dir / "eval.json")
        atomic_write_json(output_dir / "eval.json", result)
        print(format_report(result), flush=True)
        print(f"\nsaved {printable(result['output'])}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the accuracy (so a sweep over checkpoints can compare them)."""
    return run_entry(lambda c: evaluate(c)["accuracy"], cfg, phase="the evaluation",
                     stopped="no eval.json was written (it is written whole, at the end, or not at all): run it again")


if __name__ == "__main__":
    main()

"""Evaluate a checkpoint on labelled images: ``python -m hymtl.eval ckpt_path=PATH [data.root=FOLDER]``.

Without ``data.*``: the test split of the data the checkpoint was trained on (its run's
``.hydra/config.yaml``). Given other data (``data.root=FOLDER``, ``data=table data.file=…``,
``data=parquet data.files=…``): every image of it, whatever its layout. Prints per class
precision / recall / F1 / support, their macro averages, accuracy and the confusion matrix (per
label precision / recall / F1 / AP, micro/macro F1 and mAP for a multi-label model), and saves
them as ``eval.json`` — with the test figures — in ``<run>/eval/<date>_<time>/``. The service
is :mod:`hymtl.evaluation`.

The checkpoint is read with ``weights_only=True`` (no code from the file runs; a TorchScript
program is refused whatever its name: :func:`hymtl.loading.read_checkpoint`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from hymtl.cli import hymtl_main, run_entry


def _score(cfg: DictConfig) -> float | None:
    """What a sweep over checkpoints compares: the task's metric (accuracy; micro F1 for multi-label)."""
    from hymtl.evaluation import evaluate

    return evaluate(cfg)["score_value"]


@hymtl_main("eval")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the task's metric (so a sweep over checkpoints can compare them)."""
    return run_entry(_score, cfg, phase="the evaluation",
                     stopped="no eval.json was written (it is written whole, at the end, or not at all): run it again")


if __name__ == "__main__":
    main()

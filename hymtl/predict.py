"""Predict with a trained model: ``python -m hymtl.predict ckpt_path=RUN/checkpoints/best.ckpt inputs=[img.jpg,folder]``.

``ckpt_path`` is a Lightning checkpoint (PyTorch) or an ``.onnx`` written by ``hymtl.export``
(ONNX Runtime); both give the same output. Inputs are image files, folders (searched
recursively for the image extensions of :mod:`hymtl.data`) or glob patterns. Images are
prepared exactly as the model's evaluation split was (``hymtl.data.build_transforms`` with the
preprocessing saved with the model). An image that cannot be read is listed as skipped and the
others go on. Output: ``format=table|csv|json`` on stdout, or in ``out=FILE`` (written
atomically); a summary line with the throughput goes to stderr.

The work is done by :mod:`hymtl.inference` (also used by ``hymtl.export``'s parity check).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from hymtl.cli import run_entry
from hymtl.errors import HymtlError
from hymtl.runtime import config_dir

if TYPE_CHECKING:
    from hymtl.inference import PredictionResult


def run(cfg: DictConfig) -> PredictionResult:
    """The entry point's work: load, collect, predict, write; returns the result."""
    from hymtl.fileio import atomic_write_text
    from hymtl.inference import FORMATS, collect_inputs, format_result, load_predictor, predict

    for key in ("ckpt_path", "inputs"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, "", []):
            raise HymtlError(f"{key}= is required (python -m hymtl.predict ckpt_path=MODEL inputs=[IMAGES...])")
    if cfg.format not in FORMATS:
        raise HymtlError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    inputs = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    paths, skipped = collect_inputs(inputs)
    if not paths:
        detail = "; ".join(f"{s.path}: {s.reason}" for s in skipped)
        raise HymtlError(f"no images to predict ({detail})")
    predictor = load_predictor(cfg.ckpt_path)
    result = predict(predictor, paths, topk=cfg.topk, batch_size=cfg.batch_size,
                     num_workers=cfg.num_workers, skipped=skipped)
    text = format_result(result, cfg.format)
    if cfg.get("out"):
        atomic_write_text(cfg.out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if cfg.format != "json" or cfg.get("out"):
        for s in result.skipped:
            print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    print(
        f"{len(result.predictions)} images in {result.seconds:.2f} s ({result.images_per_sec:.1f} images/s, "
        f"{result.backend}, decoding included); {len(result.skipped)} skipped",
        file=sys.stderr,
    )
    if not result.predictions:
        raise HymtlError(f"none of the {len(paths)} images could be read")
    return result



@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; one ``error: ...`` line and exit code 2 on bad input."""
    run_entry(run, cfg)


if __name__ == "__main__":
    main()

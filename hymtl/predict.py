"""Predict with a trained model: ``python -m hymtl.predict ckpt_path=RUN/checkpoints/best.ckpt inputs=[img.jpg,folder]``.

``ckpt_path`` is a Lightning checkpoint (PyTorch, read ``weights_only``) or an ``.onnx`` written
by ``hymtl.export`` (ONNX Runtime); both give the same output. A TorchScript ``.pt`` is a
program (it can read and write files): it is refused unless ``trust_model=true`` says you
trust where it came from. Inputs are image files, folders (searched recursively for the image
extensions of :mod:`hymtl.data`) or glob patterns; every file passes training's file check
first (special files such as FIFOs, decompression bombs, empty files: skipped with the reason).
A checkpoint runs in eval mode, channels-last, at ``precision=auto`` (bf16 autocast where the
device has bf16 in hardware, else fp32), ``32`` (fp32) or ``bf16``; simplified for its input size
(:func:`hymtl.simplify.simplify_for_inference`: batch norms folded, static paddings).
Images are prepared exactly as the model's evaluation split was (``hymtl.data.build_transforms``
with the preprocessing saved with the model); ``tta=flip|five_crop`` averages the probabilities
of the image's views (:class:`hymtl.inference.TTAPredictor`, any backend). An image that cannot
be read is listed as skipped and the others go on. Output: ``format=table|csv|json`` on stdout, or in ``out=FILE`` (written
atomically; an existing folder is refused before predicting); a summary line with the
throughput goes to stderr. Names printed to the terminal go through
:func:`hymtl.errors.printable`; CSV/JSON keep the real names (see :mod:`hymtl.inference`).

The work is done by :mod:`hymtl.inference` (also used by ``hymtl.export``'s parity check).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from hymtl.cli import hymtl_main, run_entry
from hymtl.errors import HymtlError, printable

if TYPE_CHECKING:
    from hymtl.inference import PredictionResult


def run(cfg: DictConfig) -> PredictionResult:
    """The entry point's work: check the settings, load, collect, predict, write; returns the result."""
    from hymtl.fileio import atomic_write_text
    from hymtl.inference import (
        PredictSettings, collect_inputs, format_result, load_predictor, non_finite_count, predict, with_tta,
    )

    settings = PredictSettings.from_config(cfg)
    # a model error before a long folder walk
    predictor = with_tta(load_predictor(settings.ckpt_path, trust_model=settings.trust_model,
                                        precision=settings.precision), settings.tta)
    paths, skipped = collect_inputs(settings.inputs)
    if not paths:
        detail = "; ".join(f"{printable(s.path)}: {printable(s.reason)}" for s in skipped)
        raise HymtlError(f"no images to predict ({detail})")
    result = predict(predictor, paths, topk=settings.topk, batch_size=settings.batch_size,
                     num_workers=settings.num_workers, skipped=skipped)
    text = format_result(result, settings.format)
    if settings.out is not None:
        atomic_write_text(settings.out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if settings.format != "json" or settings.out is not None:
        for s in result.skipped:
            print(f"skipped {printable(s.path)}: {printable(s.reason)}", file=sys.stderr)
    bad = non_finite_count(result)
    if bad:
        print(f"warning: the model's output is not a number for {bad} of {len(result.predictions)} images "
              "(their probabilities are nan; null in JSON): the model is broken", file=sys.stderr)
    print(
        f"{len(result.predictions)} images in {result.seconds:.2f} s ({result.images_per_sec:.1f} images/s, "
        f"{result.backend}{_precision_note(predictor)}, decoding included); {len(result.skipped)} skipped",
        file=sys.stderr,
    )
    if not result.predictions:
        raise HymtlError(f"none of the {len(paths)} images could be read")
    return result


def _precision_note(predictor) -> str:
    """`` bf16``/`` fp32`` for the PyTorch backend (the precision ``auto`` chose), else nothing."""
    precision = getattr(predictor, "precision", None)
    tta = getattr(predictor, "tta", None)
    note = "" if precision is None else f" {'fp32' if precision == '32' else precision}"
    return note + (f", tta={tta}" if tta else "")


@hymtl_main("predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; one ``error: ...`` line and exit code 2 on bad input."""
    run_entry(run, cfg, phase="the prediction",
              stopped="no predictions were written (out= or stdout gets them whole, at the end, or not at all)")


if __name__ == "__main__":
    main()

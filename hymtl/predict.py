"""Predict with a trained model: ``python -m hymtl.predict ckpt_path=RUN/checkpoints/best.ckpt inputs=[img.jpg,folder]``.

``ckpt_path`` is a Lightning checkpoint (PyTorch) or an ``.onnx`` written by ``hymtl.export``
(ONNX Runtime); both give the same output. Inputs are image files, folders (searched
recursively for the image extensions of :mod:`hymtl.data`) or glob patterns. Images are
prepared exactly as the model's evaluation split was (``hymtl.data.build_transforms`` with the
preprocessing saved with the model). An image that cannot be read is listed as skipped and the
others go on. Output: ``format=table|csv|json`` on stdout, or in ``out=FILE`` (written
atomically); a summary line with the throughput goes to stderr.

The library API (:func:`load_predictor`, :func:`collect_inputs`, :func:`predict`) is what the
entry point and ``hymtl.export``'s parity check use.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from hymtl.backbones import Preprocessing
from hymtl.loading import load_checkpoint, load_onnx, load_torchscript, metadata_preprocessing
from hymtl.data import build_transforms, default_num_workers, is_image_file, load_rgb
from hymtl.errors import HymtlError
from hymtl.fileio import atomic_write_text
from hymtl.runtime import config_dir

FORMATS = ("table", "csv", "json")


# --------------------------------------------------------------------------- backends
class Predictor(ABC):
    """A model that maps preprocessed image batches ``(N, 3, S, S)`` to logits ``(N, classes)``."""

    backend: str
    source: str
    class_names: list[str]
    preprocessing: Preprocessing

    @abstractmethod
    def logits(self, images: torch.Tensor) -> np.ndarray:
        """float32 logits for a float32 NCHW batch."""


class TorchPredictor(Predictor):
    """The LightningModule itself (fp32, eval mode)."""

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, source: str = ""):
        self.model = model.float().eval()
        self.source = source
        self.class_names = list(model.class_names)
        self.preprocessing = model.preprocessing

    def logits(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(images).float().numpy()


class OnnxPredictor(Predictor):
    """An exported ``.onnx`` run by ONNX Runtime; class names and preprocessing from its metadata."""

    backend = "onnxruntime"

    def __init__(self, session, meta: dict, source: str = ""):
        self.session = session
        self.source = source
        self.class_names = list(meta["class_names"])
        self.preprocessing = metadata_preprocessing(meta)
        self.input_name = session.get_inputs()[0].name

    def logits(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.numpy()})[0].astype(np.float32, copy=False)


class TorchScriptPredictor(Predictor):
    """An exported TorchScript file run by ``torch.jit`` (used by the export's parity check)."""

    backend = "torchscript"

    def __init__(self, module, meta: dict, source: str = ""):
        self.module = module
        self.source = source
        self.class_names = list(meta["class_names"])
        self.preprocessing = metadata_preprocessing(meta)

    def logits(self, images: torch.Tensor) -> np.ndarray:
        # the profiling executor re-optimises the graph for each new batch shape (seconds each on a
        # CPU); plain execution runs the same kernels as eager mode
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.module(images).float().numpy()


def load_predictor(path: str | os.PathLike) -> Predictor:
    """A checkpoint (``.ckpt`` or any other name) -> PyTorch; ``.onnx`` -> ONNX Runtime; ``.pt`` TorchScript."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        session, meta = load_onnx(path)
        return OnnxPredictor(session, meta, source=path)
    if suffix in (".pt", ".torchscript"):
        module, meta = load_torchscript(path)
        return TorchScriptPredictor(module, meta, source=path)
    return TorchPredictor(load_checkpoint(path), source=path)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def _walk_images(folder: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))


def collect_inputs(inputs: Sequence[str] | str) -> tuple[list[str], list[Skipped]]:
    """Expand files, folders (recursively: image extensions only) and globs into image paths.

    A file named explicitly is taken whatever its extension (decoding decides); glob matches
    are filtered by extension like folder contents. Paths that match nothing are returned as
    skipped. Duplicates are dropped, order is kept.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    files: list[str] = []
    skipped: list[Skipped] = []
    for item in inputs:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = list(_walk_images(item))
            files += found
            if not found:
                skipped.append(Skipped(item, "folder holds no images"))
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                found += list(_walk_images(match)) if os.path.isdir(match) else [match] if is_image_file(match) else []
            files += found
            if not found:
                skipped.append(Skipped(item, "pattern matches no images"))
        else:
            skipped.append(Skipped(item, "no such file or folder"))
    return list(dict.fromkeys(files)), skipped


class _ImageFiles(Dataset):
    """``(index, tensor or None, error or None)`` per file: a bad image must not end the run."""

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.transform = build_transforms(preprocessing, train=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_rgb(self.paths[index])), None
        except Exception as exc:  # any decoder failure (truncated, not an image, bomb) skips this file only
            text = str(exc).strip().splitlines()
            return index, None, f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def iter_batches(
    paths: Sequence[str], preprocessing: Preprocessing, batch_size: int = 32, num_workers: int | str = "auto"
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Decode and preprocess ``paths`` in batches: ``(indices, images, [(index, error)])``."""
    workers = default_num_workers() if num_workers == "auto" else int(num_workers)
    workers = min(workers, max(0, len(paths) // max(1, batch_size)))  # no worker start-up for a handful
    loader = DataLoader(
        _ImageFiles(paths, preprocessing), batch_size=int(batch_size), shuffle=False,
        num_workers=workers, collate_fn=_collate,
    )
    yield from loader


# --------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first


@dataclass
class PredictionResult:
    predictions: list[Prediction]
    skipped: list[Skipped]
    backend: str
    source: str
    class_names: list[str]
    seconds: float
    logits: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def images_per_sec(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict(
    predictor: Predictor, paths: Sequence[str], topk: int = 1, batch_size: int = 32,
    num_workers: int | str = "auto", skipped: Iterable[Skipped] = (),
) -> PredictionResult:
    """Top-``topk`` labels with probabilities for every readable image (timed, decoding included)."""
    if int(batch_size) < 1:
        raise HymtlError(f"batch_size must be a positive integer, got {batch_size}")
    k = max(1, min(int(topk), len(predictor.class_names)))
    started = time.perf_counter()
    predictions: list[Prediction] = []
    all_logits: list[np.ndarray] = []
    skipped = list(skipped)
    for indices, images, bad in iter_batches(paths, predictor.preprocessing, batch_size, num_workers):
        skipped += [Skipped(paths[i], err) for i, err in bad]
        if images is None:
            continue
        logits = predictor.logits(images)
        all_logits.append(logits)
        probs = softmax(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for row, index in enumerate(indices):
            top = [(predictor.class_names[c], float(probs[row, c])) for c in order[row]]
            predictions.append(Prediction(paths[index], top))
    seconds = time.perf_counter() - started
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, len(predictor.class_names)), np.float32)
    return PredictionResult(predictions, skipped, predictor.backend, predictor.source,
                            list(predictor.class_names), seconds, logits)


# --------------------------------------------------------------------------- output
def format_result(result: PredictionResult, fmt: str) -> str:
    """The predictions as an aligned table, CSV (one row per image) or JSON (with the skipped files)."""
    k = max((len(p.top) for p in result.predictions), default=1)
    if fmt == "json":
        return json.dumps(
            {
                "model": result.source,
                "backend": result.backend,
                "class_names": result.class_names,
                "predictions": [
                    {"path": p.path, "label": p.top[0][0], "probability": round(p.top[0][1], 6),
                     "top": [{"label": l, "probability": round(pr, 6)} for l, pr in p.top]}
                    for p in result.predictions
                ],
                "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
            },
            indent=2,
        ) + "\n"
    header = ["path", "label", "probability"]
    for r in range(2, k + 1):
        header += [f"label_{r}", f"probability_{r}"]
    rows = [[p.path] + [v for label, prob in p.top for v in (label, f"{prob:.6f}")] for p in result.predictions]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "table":
        rows = [[r[0]] + [v if i % 2 == 0 else f"{float(v):.4f}" for i, v in enumerate(r[1:])] for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), *(line(r) for r in rows)]) + "\n"
    raise HymtlError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def run(cfg: DictConfig) -> PredictionResult:
    """The entry point's work: load, collect, predict, write; returns the result."""
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
    try:
        run(cfg)
    except HymtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Inference with a trained model: predictors per format, input collection, batching, output.

* :func:`load_predictor` — a Lightning checkpoint (PyTorch, ``weights_only``) or an ``.onnx``
  (ONNX Runtime), each read by :mod:`hymtl.loading` (no code from a file runs; a sidecar that
  contradicts its model is refused); a TorchScript ``.pt`` only with ``trust_model=True``
  (it is a program: refused otherwise, whatever its suffix);
* :func:`collect_inputs` — files, folders and globs, with the file rules of :mod:`hymtl.data`
  (:func:`~hymtl.data.folders.walk_images`, then training's file check
  :func:`~hymtl.data.images.check_image_file`: FIFOs and other special files, decompression
  bombs, empty and unreadable files are skipped with its reason before anything is decoded);
* :func:`iter_batches` / :func:`predict` — images prepared exactly as the model's evaluation
  split was (:func:`hymtl.data.images.build_transforms` with the preprocessing saved with the
  model); a file that cannot be read is listed as skipped and the others go on;
* :func:`format_result` — table, CSV or JSON. File names: the table shows them through
  :func:`hymtl.errors.printable` (one line each); CSV and JSON keep the real name (CSV quotes
  and JSON escapes newlines, tabs and ESC), except that bytes that are not valid UTF-8 are
  written as ``\\xNN`` — :func:`hymtl.errors.printable`'s escape — so the output stays valid
  UTF-8. JSON never holds a bare ``NaN``: a probability that is not a number is ``null``.

Used by the entry point ``hymtl.predict`` and by ``hymtl.export``'s parity check. Torch,
ONNX Runtime and the data modules are imported when first needed.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from hymtl.config import checked_number
from hymtl.errors import HymtlError, printable
from hymtl.simplify import Simplified, simplify_for_inference

if TYPE_CHECKING:
    import torch

    from hymtl.backbones import Preprocessing

FORMATS = ("table", "csv", "json")


# --------------------------------------------------------------------------- backends
class Predictor(ABC):
    """A model that maps preprocessed image batches ``(N, 3, S, S)`` to logits ``(N, classes)``."""

    backend: str

    def __init__(self, class_names, preprocessing: Preprocessing, source: str = "", task: dict | None = None,
                 thresholds: Sequence[float] | None = None):
        from hymtl.tasks import make_task

        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.source = source
        self.task = make_task(task)  # what the logits mean: softmax and top-k, or sigmoid and thresholds
        self.thresholds = list(thresholds) if thresholds is not None else None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The task's probabilities of a batch of logits (softmax, or a sigmoid per label)."""
        import torch

        return self.task.probabilities(torch.from_numpy(np.ascontiguousarray(logits))).double().numpy()

    def decode(self, probabilities: np.ndarray, topk: int = 1) -> list[tuple[str, float]]:
        """One image's labels with their probabilities, best first (:meth:`hymtl.tasks.Task.decode`)."""
        return self.task.decode(probabilities, self.class_names, topk, self.thresholds)

    @abstractmethod
    def logits(self, images: torch.Tensor) -> np.ndarray:
        """float32 logits for a float32 NCHW batch."""

    def input_transform(self):
        """The transform of a decoded image into this predictor's input; ``None``: the
        evaluation transform of its preprocessing (:func:`hymtl.data.images.build_transforms`)."""
        return None


PRECISIONS = ("auto", "32", "bf16")


def checked_precision(value) -> str:
    """``"auto"``, ``"32"`` (``32`` as Hydra parses it too) or ``"bf16"``; a :class:`HymtlError`
    (one line) otherwise."""
    text = str(value).strip().lower() if not isinstance(value, bool) else ""
    if text not in PRECISIONS:
        raise HymtlError(f"precision must be one of {', '.join(PRECISIONS)}, got {printable(str(value))}")
    return text


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 in hardware: CUDA's ``is_bf16_supported``; on a CPU the rule
    training's ``precision=auto`` uses (:func:`hymtl.runtime.cpu_has_native_bf16`: AVX512-BF16 or
    AMX). Emulated bf16 (plain AVX-512 or AVX2) is slower than fp32."""
    import torch

    from hymtl.runtime import cpu_has_native_bf16

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision, device: torch.device | str = "cpu") -> str:
    """``"32"`` or ``"bf16"`` for a :data:`PRECISIONS` choice: ``auto`` is bf16 where
    :func:`native_bf16`, else fp32."""
    precision = checked_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "32"
    return precision


class TorchPredictor(Predictor):
    """The LightningModule itself: eval mode, ``torch.inference_mode``, channels-last parameters
    and inputs (the fast convolution layout on CPU and GPU; the module's own ``forward`` also
    converts inputs when ``hparams.channels_last``), rewritten by :func:`simplify_for_inference`
    for its input size (batch norms folded, static paddings; ``self.simplified`` says what
    changed; ``simplify=False`` runs the module exactly as trained, as ``hymtl.export``'s parity
    reference does). The predictor owns ``model``: it is changed in place.

    ``precision``: ``"32"`` (the default: fp32), ``"bf16"`` (bf16 autocast) or ``"auto"`` (bf16
    where the device has it in hardware, :func:`native_bf16`; else fp32). ``self.precision`` is
    the resolved one. Logits are returned as float32 whatever the precision.
    """

    backend = "pytorch"

    def __init__(self, model: torch.nn.Module, source: str = "", precision: str = "32", simplify: bool = True):
        import torch

        thresholds = model.thresholds.tolist() if getattr(model, "thresholds", None) is not None else None
        super().__init__(model.class_names, model.preprocessing, source, task=model.task.describe(),
                         thresholds=thresholds)
        model = model.float().eval()
        self.device = next(model.parameters()).device
        size = self.preprocessing.input_size
        self.input_shape = (3, size, size)
        self.simplified = Simplified()
        if simplify:
            model, self.simplified = simplify_for_inference(model, torch.zeros(2, *self.input_shape, device=self.device))
        self.model = model.to(memory_format=torch.channels_last)
        self.precision = resolve_precision(precision, self.device)

    def logits(self, images: torch.Tensor) -> np.ndarray:
        import torch

        if self.simplified != Simplified() and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"this predictor takes images of shape {self.input_shape} (its preprocessing), "
                             f"got {tuple(images.shape[1:])}")
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.model(images).float().cpu().numpy()


class OnnxPredictor(Predictor):
    """An exported ``.onnx`` run by ONNX Runtime; class names and preprocessing from its metadata."""

    backend = "onnxruntime"

    def __init__(self, session, meta: dict, source: str = ""):
        super().__init__(meta["class_names"], _preprocessing_of(meta), source, meta.get("task"), meta.get("thresholds"))
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def logits(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.numpy()})[0].astype(np.float32, copy=False)


class TorchScriptPredictor(Predictor):
    """An exported TorchScript file run by ``torch.jit`` (used by the export's parity check)."""

    backend = "torchscript"

    def __init__(self, module, meta: dict, source: str = ""):
        super().__init__(meta["class_names"], _preprocessing_of(meta), source, meta.get("task"), meta.get("thresholds"))
        self.module = module

    def logits(self, images: torch.Tensor) -> np.ndarray:
        # the profiling executor re-optimises the graph for each new batch shape (seconds each on a
        # CPU); plain execution runs the same kernels as eager mode
        import torch

        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.module(images).float().numpy()


class TTAPredictor(Predictor):
    """Test-time augmentation around any predictor (PyTorch, ONNX Runtime, TorchScript): each
    image is given as its views (:func:`hymtl.data.images.build_test_views`: ``flip`` the image
    and its mirror image, ``five_crop`` the corner and center crops of the resized image), the
    wrapped predictor scores all views in one batch, and the views' probabilities (the task's:
    softmax, or a sigmoid per label) are averaged. :meth:`logits` returns the logits of those
    averaged probabilities (:meth:`hymtl.tasks.Task.logits_of`), so the task's probabilities of
    them (what :func:`predict` reports) are the averaged probabilities themselves."""

    def __init__(self, predictor: Predictor, tta: str) -> None:
        from hymtl.data.images import build_test_views

        super().__init__(predictor.class_names, predictor.preprocessing, predictor.source,
                         predictor.task.describe(), predictor.thresholds)
        self.predictor, self.tta = predictor, tta
        self.views = build_test_views(predictor.preprocessing, tta)  # checks tta
        self.backend = predictor.backend
        self.precision = getattr(predictor, "precision", None)

    def input_transform(self):
        return self.views

    def logits(self, images: torch.Tensor) -> np.ndarray:
        """``images``: ``(N, V, 3, S, S)`` (the views of :meth:`input_transform`) or ``(N, 3, S, S)``
        (one view each); log of the views' averaged probabilities ``(N, classes)``."""
        if images.dim() == 4:
            images = images.unsqueeze(1)
        import torch

        count, views = images.shape[:2]
        probabilities = self.predictor.probabilities(self.predictor.logits(images.flatten(0, 1).contiguous()))
        averaged = probabilities.reshape(count, views, -1).mean(axis=1)
        return self.task.logits_of(torch.from_numpy(averaged)).float().numpy()


def checked_tta(value) -> str:
    """A test-time augmentation choice (:data:`hymtl.data.images.TTA_CHOICES`; ``None``: ``none``);
    a :class:`HymtlError` naming the choices otherwise."""
    from hymtl.data.images import TTA_CHOICES

    tta = "none" if value is None else str(value)
    if tta not in TTA_CHOICES:
        raise HymtlError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {printable(tta)}")
    return tta


def with_tta(predictor: Predictor, tta: str | None) -> Predictor:
    """``predictor`` with test-time augmentation ``tta`` (``none``/``None``: unchanged)."""
    tta = checked_tta(tta)
    return predictor if tta == "none" else TTAPredictor(predictor, tta)


def _preprocessing_of(meta: dict) -> Preprocessing:
    from hymtl.loading import metadata_preprocessing

    return metadata_preprocessing(meta)


def load_predictor(path: str | os.PathLike, trust_model: bool = False, precision: str = "32") -> Predictor:
    """``.onnx`` -> ONNX Runtime; a TorchScript archive (told by its content, whatever its
    suffix) -> ``torch.jit`` only with ``trust_model=True``; anything else is read as a Lightning
    checkpoint (PyTorch, run at ``precision``: see :class:`TorchPredictor`). All through
    :mod:`hymtl.loading`. ``precision`` is checked for every format (it only changes PyTorch)."""
    from hymtl.loading import check_model_file, is_torchscript_archive, load_onnx, load_torchscript

    import zipfile

    precision = checked_precision(precision)
    path = str(path)
    suffix = Path(path).suffix.lower()
    what = {".onnx": "ONNX model", ".pt": "TorchScript model", ".torchscript": "TorchScript model"}.get(suffix, "checkpoint")
    check_model_file(path, what)  # the file rule, before the format is sniffed (a FIFO or /dev/zero is never opened)
    if suffix == ".onnx":
        session, meta = load_onnx(path)
        return OnnxPredictor(session, meta, source=path)
    # a .pt that is a zip but no TorchScript is a checkpoint saved under that name (weights only)
    if is_torchscript_archive(path) or (suffix in (".pt", ".torchscript") and not zipfile.is_zipfile(path)):
        module, meta = load_torchscript(path, trust=trust_model)
        return TorchScriptPredictor(module, meta, source=path)
    from hymtl.model import load_checkpoint  # Lightning and the backbones: only for a checkpoint

    return TorchPredictor(load_checkpoint(path), source=path, precision=precision)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def collect_inputs(inputs: Sequence[str] | str) -> tuple[list[str], list[Skipped]]:
    """Expand files, folders (recursively: image extensions only) and globs into image paths.

    Folders follow the file rules of :mod:`hymtl.data.folders` (:func:`walk_images`: hidden
    entries skipped, sorted). A file named explicitly is taken whatever its extension (decoding
    decides); glob matches are filtered by extension like folder contents, and ``**`` walks as
    folders do (:func:`glob_without_loops`: symlinked folders not entered, so no loops); a file
    reached under two names is kept once (its first). Then every path goes
    through training's file check (:func:`hymtl.data.images.check_files`: stat and image
    header, no pixels): a FIFO or other special file, a decompression bomb, an empty or
    unreadable file is skipped with its reason and never opened for decoding. Paths that match
    nothing are returned as skipped. Duplicates are dropped, order is kept.
    """
    from hymtl.data.folders import is_image_file, walk_images
    from hymtl.data.images import check_files

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    files: list[str] = []
    skipped: list[Skipped] = []
    for item in inputs:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = list(walk_images(item))
            files += found
            if not found:
                skipped.append(Skipped(item, "folder holds no images"))
        elif os.path.lexists(item):  # a file, a FIFO, a broken link…: the file check says which
            files.append(item)
        elif glob.has_magic(item):
            found = []
            for match in glob_without_loops(item):
                found += list(walk_images(match)) if os.path.isdir(match) else [match] if is_image_file(match) else []
            files += found
            if not found:
                skipped.append(Skipped(item, "pattern matches no images"))
        else:
            skipped.append(Skipped(item, "no such file or folder"))
    files = _each_file_once(files)
    reasons = check_files(files)  # training's file check, with its progress and summary line
    skipped += [Skipped(path, reasons[path]) for path in files if path in reasons]
    return [path for path in files if path not in reasons], skipped


def _each_file_once(files: Sequence[str]) -> list[str]:
    """``files`` in order, without a second name of a file already there (its first name kept)."""
    seen: set[str] = set()
    unique = []
    for path in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def glob_without_loops(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)`` by training's walking rules
    (:func:`hymtl.data.folders.walk_images`): ``**`` never enters a symlinked folder, so a link
    to ``.`` or to a parent cannot loop; hidden entries match only a pattern that starts with
    ``.``. Sorted, each path once."""
    absolute = pattern.startswith(os.sep)
    parts = [p for p in pattern.split(os.sep) if p]
    current = [os.sep if absolute else ""]
    for part in parts:
        found: list[str] = []
        for base in current:
            if part == "**":
                found += _folders_below(base)
            elif glob.has_magic(part):
                found += [os.path.join(base, name) for name in _listdir(base)
                          if (part.startswith(".") or not name.startswith(".")) and fnmatch.fnmatch(name, part)]
            else:
                found.append(os.path.join(base, part))
        current = list(dict.fromkeys(found))
    return [p for p in current if p and os.path.lexists(p)]


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder or "."))
    except OSError:  # not a folder, gone, unreadable: matches nothing
        return []


def _folders_below(folder: str) -> list[str]:
    """``folder`` and every visible folder below it; symlinked folders are not entered."""
    if folder and not os.path.isdir(folder):
        return []
    found = [folder]
    for dirpath, dirnames, _ in os.walk(folder or ".", followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d)))
        found += [os.path.join(dirpath, d) if folder else os.path.relpath(os.path.join(dirpath, d)) for d in dirnames]
    return found


def _skip_reason(path: str) -> str:
    """Why an image was dropped from its batch, in the words of the data check (decoding included)."""
    from hymtl.data.images import check_image_file

    return check_image_file(path, decode=True) or "cannot transform: the image does not fit the preprocessing"


def iter_batches(
    paths: Sequence[str], preprocessing: Preprocessing, batch_size: int = 32, num_workers: int | str = "auto",
    transform=None,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Decode and preprocess ``paths`` in batches: ``(indices, images, [(index, reason)])``.

    The images are prepared as the evaluation split of :mod:`hymtl.data` prepares them (the
    same dataset, :class:`~hymtl.data.images.ImageSampleDataset`, with the evaluation
    transforms and decode size); a file that fails is dropped from its batch by data's rule
    and listed with the reason :func:`hymtl.data.images.check_image_file` gives. ``transform``
    replaces the evaluation transform (a predictor's :meth:`Predictor.input_transform`: TTA views).
    """
    from torch.utils.data import DataLoader

    from hymtl.data.samples import Sample
    from hymtl.data.images import ImageSampleDataset, build_transforms
    from hymtl.data.loaders import collate_skipping, default_num_workers, start_worker

    batch_size = int(batch_size)
    workers = default_num_workers() if num_workers == "auto" else int(num_workers)
    workers = min(workers, max(0, len(paths) // max(1, batch_size)))  # no worker start-up for a handful
    # the label of each sample is its index: a batch says which of its files survived
    # a path, or a sample whose bytes a source holds (hymtl.eval's test-time augmentation on Parquet data)
    dataset = ImageSampleDataset([Sample(p.path, i, p.data) if isinstance(p, Sample) else Sample(str(p), i)
                                  for i, p in enumerate(paths)],
                                 transform or build_transforms(preprocessing, train=False), skip_bad=True,
                                 decode_size=preprocessing.resize_size)
    # a plain DataLoader: the batches of failed files (None) keep the positions below
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skipping, worker_init_fn=start_worker)
    for start, batch in zip(range(0, len(paths), batch_size), loader):
        wanted = range(start, min(start + batch_size, len(paths)))
        images, indices = (None, []) if batch is None else (batch[0], batch[1].tolist())
        kept = set(indices)
        yield indices, images, [(i, _skip_reason(paths[i])) for i in wanted if i not in kept]


# --------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first: the top k, or every label over its threshold


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


def positive_int(value, name: str) -> int:
    """``value`` as an integer >= 1 (``"8"`` too): :func:`hymtl.config.checked_number`'s rule."""
    return checked_number(name, value, "integer", 1)


def worker_count(value) -> int | str:
    """``"auto"`` or an integer >= 0 (DataLoader worker processes): :func:`hymtl.config.checked_number`'s rule."""
    return checked_number("num_workers", value, "integer", 0)


def predict(
    predictor: Predictor, paths: Sequence[str], topk: int = 1, batch_size: int = 32,
    num_workers: int | str = "auto", skipped: Iterable[Skipped] = (),
) -> PredictionResult:
    """Top-``topk`` labels with probabilities for every readable image (timed, decoding included)."""
    batch_size, topk = positive_int(batch_size, "batch_size"), positive_int(topk, "topk")
    num_workers = worker_count(num_workers)
    k = min(topk, len(predictor.class_names))
    started = time.perf_counter()
    predictions: list[Prediction] = []
    all_logits: list[np.ndarray] = []
    skipped = list(skipped)
    for indices, images, bad in iter_batches(paths, predictor.preprocessing, batch_size, num_workers,
                                             transform=predictor.input_transform()):
        skipped += [Skipped(getattr(paths[i], "path", paths[i]), err) for i, err in bad]
        if images is None:
            continue
        logits = predictor.logits(images)
        all_logits.append(logits)
        probs = predictor.probabilities(logits)
        for row, index in enumerate(indices):
            predictions.append(Prediction(getattr(paths[index], "path", paths[index]), predictor.decode(probs[row], k)))
    seconds = time.perf_counter() - started
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, len(predictor.class_names)), np.float32)
    return PredictionResult(predictions, skipped, predictor.backend, predictor.source,
                            list(predictor.class_names), seconds, logits)


def accuracy_on(predictor: Predictor, paths: Sequence[str], labels: Sequence[int], batch_size: int = 32,
                num_workers: int | str = "auto") -> dict:
    """Accuracy (micro: the fraction of images right) and its macro average (torchmetrics, as
    training reports them) of ``predictor`` on labelled images: what ``hymtl.eval`` reports for a
    test-time augmentation beside the plain result. Unreadable files are left out and counted."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    result = predict(predictor, paths, topk=1, batch_size=batch_size, num_workers=num_workers)
    by_path = {getattr(p, "path", p): i for i, p in enumerate(paths)}
    kept = [by_path[p.path] for p in result.predictions]
    num_classes = len(predictor.class_names)
    predicted = torch.as_tensor(result.logits.argmax(axis=1)) if kept else torch.zeros(0, dtype=torch.long)
    target = torch.as_tensor([int(labels[i]) for i in kept], dtype=torch.long)
    scores = {name: float(MulticlassAccuracy(num_classes, average=name)(predicted, target)) if kept else float("nan")
              for name in ("micro", "macro")}
    return {"accuracy": scores["micro"], "accuracy_macro": scores["macro"], "num_images": len(kept),
            "skipped": len(result.skipped), "seconds": result.seconds}


# --------------------------------------------------------------------------- output
def output_name(text: str) -> str:
    """A name for a machine-readable output (CSV, JSON): the name itself, except that bytes that
    are not valid UTF-8 (``os.fsdecode``'s surrogate escapes) become ``\\xNN`` as
    :func:`hymtl.errors.printable` shows them, so the output stays valid UTF-8."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if _has_surrogates(text) else text


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _probability(value: float) -> float | None:
    """Rounded for the JSON output; ``None`` (JSON ``null``) for a value that is not a number:
    strict JSON has no ``NaN``."""
    return round(value, 6) if math.isfinite(value) else None


def non_finite_count(result: PredictionResult) -> int:
    """Images whose logits are not all finite numbers (their probabilities mean nothing)."""
    return int((~np.isfinite(result.logits)).any(axis=1).sum()) if result.logits.size else 0


def format_result(result: PredictionResult, fmt: str) -> str:
    """The predictions as an aligned table, CSV (one row per image) or JSON (with the skipped files).

    Names: see the module docstring (table: :func:`~hymtl.errors.printable`; CSV and JSON:
    :func:`output_name`). JSON is strict: ``allow_nan=False``, a non-number probability is ``null``.
    """
    k = max((len(p.top) for p in result.predictions), default=1)
    if fmt == "json":
        return json.dumps(
            {
                "model": output_name(result.source),
                "backend": result.backend,
                "class_names": result.class_names,
                "predictions": [
                    {"path": output_name(p.path), "label": p.top[0][0] if p.top else None,
                     "probability": _probability(p.top[0][1]) if p.top else None,
                     "top": [{"label": l, "probability": _probability(pr)} for l, pr in p.top]}
                    for p in result.predictions
                ],
                "skipped": [{"path": output_name(s.path), "reason": output_name(s.reason)} for s in result.skipped],
            },
            indent=2, allow_nan=False,
        ) + "\n"
    header = ["path", "label", "probability"]
    for r in range(2, k + 1):
        header += [f"label_{r}", f"probability_{r}"]
    if fmt == "csv":
        rows = [[output_name(p.path)] + [v for label, prob in p.top for v in (label, f"{prob:.6f}")]
                for p in result.predictions]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "table":
        rows = [[printable(p.path)] + [v for label, prob in p.top for v in (printable(label), f"{prob:.4f}")]
                for p in result.predictions]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(header), *(line(r) for r in rows)]) + "\n"
    raise HymtlError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PredictSettings:
    """``conf/predict.yaml``, checked (:meth:`from_config`): what ``hymtl.predict`` runs with."""

    ckpt_path: str
    inputs: str | list[str]
    format: str
    topk: int
    batch_size: int
    num_workers: int | str
    precision: str
    trust_model: bool
    out: Path | None
    tta: str

    @classmethod
    def from_config(cls, cfg) -> PredictSettings:
        """Every setting checked before anything is read: a :class:`HymtlError` (one line) for
        the first that is missing or wrong (numbers by :func:`hymtl.config.checked_number`)."""
        from omegaconf import OmegaConf

        for key in ("ckpt_path", "inputs"):
            if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, "", []):
                raise HymtlError(f"{key}= is required (python -m hymtl.predict ckpt_path=MODEL inputs=[IMAGES...])")
        if cfg.format not in FORMATS:
            raise HymtlError(f"format must be one of {', '.join(FORMATS)}, got {printable(cfg.format)}")
        topk, batch_size = positive_int(cfg.topk, "topk"), positive_int(cfg.batch_size, "batch_size")
        num_workers = worker_count(cfg.num_workers)
        precision = checked_precision(cfg.get("precision", "auto"))
        trust_model = cfg.get("trust_model", False)
        if not isinstance(trust_model, bool):
            raise HymtlError(f"trust_model must be true or false, got {printable(trust_model)}")
        out = Path(str(cfg.out)).expanduser() if cfg.get("out") else None
        if out is not None and out.is_dir():  # before the work, not after it
            raise HymtlError(f"out={printable(out)} is a folder: give the name of the file to write the predictions to")
        return cls(
            ckpt_path=cfg.ckpt_path, inputs=cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs),
            format=cfg.format, topk=topk, batch_size=batch_size, num_workers=num_workers, precision=precision,
            trust_model=trust_model, out=out, tta=checked_tta(cfg.get("tta")),
        )

"""Exporting a trained model to run without hymtl, and proving it gives the same answers: what
``hymtl.export`` runs.

* ``onnx``: one self-contained ``.onnx`` file, dynamic batch axis (``images``: ``(batch, 3, S, S)``
  float32 -> ``logits``: ``(batch, classes)``). Default exporter: PyTorch's ``torch.export``-based
  ("dynamo") exporter at opset 18 — the lowest opset it can write for the EfficientNet-Lite
  family (their TF-"same" ``Pad`` has no down-converter to 17), a compact graph and the faster of
  the two under ONNX Runtime. ``onnx.exporter=torchscript onnx.opset=17`` uses the legacy
  TorchScript-based exporter for runtimes that stop at opset 17 (same parity; deprecated by
  PyTorch). The requested opset is checked, never silently changed.
* ``torchscript``: ``torch.jit.trace`` of backbone + head, loadable with ``torch.jit.load`` (also
  from C++).

Beside the model, a JSON sidecar ``<model file>.json`` holds the class names, the preprocessing
(input size, resize size, mean/std, interpolation, center crop), the model file's SHA-256 and
the parity figures; ONNX files carry the same description in their metadata (key ``hymtl``).

**Parity is part of the export** (:func:`export_checkpoint`, then :func:`write_export` only when
it holds): the exported model runs (ONNX Runtime / ``torch.jit.load``) on real images next to the
LightningModule, both fp32 on the same preprocessed batches (batch size ``parity.batch_size``,
so a full and a partial batch exercise the dynamic batch axis). The maximum absolute logit
difference must be <= ``parity.atol`` (1e-4) and the top-1 class the same on every image. The
default images are the validation split of the run's data
(:func:`hymtl.data.sources.trained_validation_inputs`); ``parity.inputs=[...]`` sets others; they
pass the same file rules as training and prediction (:func:`hymtl.inference.collect_inputs`).

Each phase (reading the checkpoint, exporting, loading the export back, parity, writing) says
when it starts and logs one line with its duration when it ends (the ONNX export alone takes
about a minute on a CPU); the parity phase shows a bar on a terminal (:class:`hymtl.progress.Progress`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig, OmegaConf

from hymtl.config import checked_number
from hymtl.errors import HymtlError, first_line, printable
from hymtl.progress import Progress

if TYPE_CHECKING:
    from torch import nn

    from hymtl.inference import Predictor

log = logging.getLogger("hymtl.export")  # the command's name: its lines are the command's

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_EXPORTERS = ("dynamo", "torchscript")


class ExportError(HymtlError):
    """The model cannot be exported as asked (unsupported opset, no parity images, …)."""


class ParityError(ExportError):
    """The exported model does not reproduce the checkpoint's logits; nothing was written."""

    exit_code = 3  # not 2: the input was fine, the exported model is not


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ExportSettings:
    """``conf/export.yaml``, checked (:meth:`from_config`); the numbers stay as typed and are
    read where they are used."""

    ckpt: Path
    out: Path
    format: str
    onnx_exporter: Any
    onnx_opset: Any
    parity_inputs: list  # file/folder/glob names, or the samples of the run's data source
    parity: DictConfig  # max_images, atol, batch_size, num_workers

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExportSettings:
        """The settings of ``cfg``: a one-line :class:`ExportError` for the first that is missing
        or wrong, before anything is read or exported."""
        from hymtl.data.sources import trained_validation_inputs

        if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
            raise ExportError("ckpt_path= is required (python -m hymtl.export ckpt_path=CKPT format=onnx)")
        if cfg.format not in FORMATS:
            raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
        ckpt = Path(str(cfg.ckpt_path)).expanduser()
        out = Path(str(cfg.out)).expanduser() if cfg.get("out") else ckpt.with_suffix(FORMATS[cfg.format])
        if out.resolve() == ckpt.resolve():
            raise ExportError(f"out={printable(out)} would overwrite the checkpoint")
        parity = checked_parity(cfg.parity)
        inputs = list(cfg.parity.inputs) if cfg.parity.get("inputs") else trained_validation_inputs(ckpt)
        if not inputs:
            raise ExportError(
                "parity needs real images and the run's data folder was not found: pass parity.inputs=[FOLDER or FILES]"
            )
        return cls(ckpt=ckpt, out=out, format=str(cfg.format), onnx_exporter=cfg.onnx.exporter,
                   onnx_opset=cfg.onnx.opset, parity_inputs=inputs, parity=parity)


def checked_parity(parity: DictConfig) -> DictConfig:
    """``parity.*``'s numbers by the one number rule (:func:`hymtl.config.checked_number`), before
    anything is read: ``max_images`` null or >= 1, ``atol`` >= 0, ``batch_size`` >= 1,
    ``num_workers`` ``auto`` or >= 0."""
    checked = OmegaConf.to_container(parity, resolve=True)
    if checked.get("max_images") is not None:
        checked["max_images"] = checked_number("parity.max_images", checked["max_images"], "integer", 1)
    checked["atol"] = checked_number("parity.atol", checked["atol"], "number", 0)
    checked["batch_size"] = checked_number("parity.batch_size", checked["batch_size"], "integer", 1)
    checked["num_workers"] = checked_number("parity.num_workers", checked["num_workers"], "integer", 0)
    return OmegaConf.create(checked)


def parity_images(inputs: Sequence, max_images: Any = None) -> list:
    """The images parity runs on: ``inputs`` (names of files, folders, globs; or a data source's
    samples) through the file rules of training and prediction, at most ``max_images``; an
    :class:`ExportError` when none is left."""
    from hymtl.inference import Skipped, collect_inputs

    if all(isinstance(i, str) for i in inputs):
        paths, missing = collect_inputs(list(inputs))
    else:  # the samples of the run's source (a label file's files, Parquet's bytes): checked as training checks them
        from hymtl.data.images import check_files

        reasons = check_files(inputs)
        paths, missing = [i for i in inputs if i.path not in reasons], [Skipped(p, r) for p, r in reasons.items()]
    if max_images:
        paths = paths[: int(max_images)]
    if not paths:
        raise ExportError(f"no parity images in {printable(inputs)} ({'; '.join(printable(s.reason) for s in missing)})")
    return paths


# --------------------------------------------------------------------------- exporters
def exportable(model: nn.Module) -> nn.Module:
    """Backbone + head of a :class:`~hymtl.model.TransferModule`, without Lightning: what is exported
    (the parameters keep their names, ``backbone.*`` and ``head.*``)."""
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(OrderedDict(backbone=model.backbone, head=model.head)).eval()


def _example_input(size: int, batch: int = 2):
    import torch

    # batch 2, not 1: tracing with 1 can specialise the batch dimension
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def onnx_bytes(model: nn.Module, meta: dict, opset: int = 18, exporter: str = "dynamo") -> bytes:
    """The model as a serialized ONNX file (weights inside, ``meta`` in ``metadata_props``)."""
    import onnx
    import torch

    from hymtl.loading import ONNX_METADATA_KEY

    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"onnx.exporter must be one of {', '.join(ONNX_EXPORTERS)}, got {exporter!r}")
    net = exportable(model)
    example = _example_input(meta["preprocessing"]["input_size"])
    common = dict(input_names=["images"], output_names=["logits"], opset_version=int(opset))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: chosen knowingly
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(net, (example,), None, dynamo=True, dynamic_shapes=({0: batch},),
                                            verbose=False, optimize=True, **common)
                proto = program.model_proto
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    torch.onnx.export(net, (example,), f"{tmp}/model.onnx", dynamo=False,
                                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **common)
                    proto = onnx.load(f"{tmp}/model.onnx")
    except Exception as exc:
        raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != int(opset):
        hint = " (use onnx.exporter=torchscript for opset 17)" if exporter == "dynamo" and int(opset) < 18 else ""
        raise ExportError(f"the {exporter} exporter wrote opset {got} instead of the requested {opset}{hint}")
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta, sort_keys=True)
    proto.producer_name = "hymtl"
    return proto.SerializeToString()


def torchscript_bytes(model: nn.Module, meta: dict) -> bytes:
    """The model traced to TorchScript, ``meta`` stored as the archive's extra file ``hymtl.json``."""
    import io

    import torch

    from hymtl.loading import TORCHSCRIPT_METADATA_FILE

    net = exportable(model)
    example = _example_input(meta["preprocessing"]["input_size"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic in timm's "same" padding
            # (and torch.jit's deprecation notice: TorchScript is still what libtorch/C++ loads)
            # no check_trace: the parity check that follows compares far more (real images, two batch sizes)
            traced = torch.jit.trace(net, (example,), check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta, sort_keys=True)})
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {type(exc).__name__}: {str(exc).strip()[:300]}") from None
    return buffer.getvalue()


# --------------------------------------------------------------------------- parity
@dataclass
class ParityReport:
    """How closely the exported model reproduces the checkpoint."""

    backend: str
    images: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agree: int  # images whose decision agrees: the top class, or a multi-label model's label set
    atol: float
    batch_sizes: list[int]
    skipped: int

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.max_abs_logit_diff <= self.atol and self.top1_agree == self.images

    max_abs_prob_diff: float = float("nan")
    decision: str = "top-1"  # what top1_agree compares: "top-1" or "label sets"

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"parity {self.backend} vs checkpoint (fp32) on {self.images} images: max |logit diff| "
            f"{self.max_abs_logit_diff:.2e} (limit {self.atol:.0e}), mean {self.mean_abs_logit_diff:.2e}, "
            f"max |probability diff| {self.max_abs_prob_diff:.2e}, "
            f"{self.decision} agree {self.top1_agree}/{self.images}, batch sizes {sorted(set(self.batch_sizes))}: "
            f"{verdict}"
        )


def check_parity(
    reference: Predictor, candidate: Predictor, paths: Sequence[str], atol: float = 1e-4,
    batch_size: int = 32, num_workers: int | str = "auto", progress: Progress | None = None,
) -> ParityReport:
    """Run both models on the same preprocessed batches of ``paths`` and compare their logits,
    their probabilities and their decisions (the top class; a multi-label model's label sets at
    its thresholds) (``progress``: advanced by each batch's files)."""
    import numpy as np

    from hymtl.inference import iter_batches

    if reference.class_names != candidate.class_names or reference.preprocessing != candidate.preprocessing:
        raise ParityError("the exported model's class names or preprocessing differ from the checkpoint's")
    if reference.task.describe() != candidate.task.describe() or reference.thresholds != candidate.thresholds:
        raise ParityError("the exported model's task or thresholds differ from the checkpoint's")
    diffs, agree, sizes, skipped, prob_diff = [], 0, [], 0, 0.0
    for _, images, bad in iter_batches(paths, reference.preprocessing, batch_size, num_workers):
        skipped += len(bad)
        if progress is not None:
            progress.update((0 if images is None else len(images)) + len(bad), skipped=skipped)
        if images is None:
            continue
        ref, got = reference.logits(images), candidate.logits(images)
        if got.shape != ref.shape:
            raise ParityError(f"the exported model returned logits of shape {got.shape} for a batch of {len(images)}")
        diffs.append(np.abs(ref.astype(np.float64) - got.astype(np.float64)).reshape(-1))
        ref_p, got_p = reference.probabilities(ref), candidate.probabilities(got)
        prob_diff = max(prob_diff, float(np.abs(ref_p - got_p).max()))
        agree += sum({label for label, _ in reference.decode(a)} == {label for label, _ in candidate.decode(b)}
                     if reference.task.multilabel else int(a.argmax()) == int(b.argmax()) for a, b in zip(ref_p, got_p))
        sizes.append(len(images))
    flat = np.concatenate(diffs) if diffs else np.zeros(0)
    return ParityReport(
        backend=candidate.backend, images=int(sum(sizes)),
        max_abs_logit_diff=float(flat.max()) if flat.size else float("nan"),
        mean_abs_logit_diff=float(flat.mean()) if flat.size else float("nan"),
        top1_agree=agree, atol=float(atol), batch_sizes=sizes, skipped=skipped,
        max_abs_prob_diff=prob_diff if sizes else float("nan"),
        decision="label sets" if reference.task.multilabel else "top-1",
    )


# --------------------------------------------------------------------------- the export, phase by phase
@contextmanager
def phase(name: str):
    """One phase of the export: a line when it starts (so a long one is not silent) and one
    with its duration when it ends."""
    log.info("%s ...", name)
    started = time.perf_counter()
    yield
    log.info("%s: done in %.1fs", name, time.perf_counter() - started)


@dataclass
class Exported:
    """An export held in memory, not written yet: the model file's bytes, its description (the
    sidecar's content) and how closely it reproduces the checkpoint."""

    data: bytes
    meta: dict
    report: ParityReport


def export_checkpoint(settings: ExportSettings) -> Exported:
    """Read the checkpoint, export it, load the export back and check parity; nothing is written
    (:func:`write_export` does that, when the report is ``ok``)."""
    from hymtl.model import load_checkpoint

    paths = parity_images(settings.parity_inputs, settings.parity.get("max_images"))
    with phase(f"reading checkpoint {printable(settings.ckpt)}"):
        model = load_checkpoint(settings.ckpt)
    meta = export_description(model, settings)
    if settings.format == "onnx":
        phase_name = (f"exporting to ONNX ({settings.onnx_exporter} exporter, opset {settings.onnx_opset}; "
                      "about a minute on a CPU)")
        with phase(phase_name):
            data = onnx_bytes(model, meta, opset=settings.onnx_opset, exporter=settings.onnx_exporter)
    else:
        with phase("tracing to TorchScript"):
            data = torchscript_bytes(model, meta)
    return Exported(data, meta, export_parity(model, data, meta, settings, paths))


def export_description(model, settings: ExportSettings) -> dict:
    """What the sidecar and the file's metadata say of the export (:func:`hymtl.loading.export_metadata`)."""
    import torch

    from hymtl.loading import export_metadata, sha256_bytes

    meta = export_metadata(
        model.class_names, model.preprocessing, settings.format, task=model.task.describe(),
        thresholds=model.thresholds.tolist() if model.thresholds is not None else None,
        backbone=model.hparams.backbone, source_checkpoint=settings.ckpt.name,
        source_sha256=sha256_bytes(settings.ckpt.read_bytes()), torch_version=torch.__version__,
    )
    if settings.format == "onnx":
        meta.update(opset=int(settings.onnx_opset), exporter=str(settings.onnx_exporter))
    meta.update(dynamic_axes={"images": [0], "logits": [0]})
    return meta


def export_parity(model, data: bytes, meta: dict, settings: ExportSettings, paths: Sequence) -> ParityReport:
    """Load ``data`` back through the same safe loaders users get, from a scratch folder, and
    compare it with ``model`` exactly as trained on ``paths`` (:func:`check_parity`)."""
    from hymtl.inference import OnnxPredictor, TorchPredictor, TorchScriptPredictor
    from hymtl.loading import LoadError, load_onnx, load_torchscript, write_sidecar

    out = settings.out
    with tempfile.TemporaryDirectory(prefix=".hymtl-export.") as tmp:
        staged = Path(tmp) / out.name
        staged.write_bytes(data)
        write_sidecar(staged, meta)
        try:
            with phase("loading the export back (hymtl.loading)"):
                if settings.format == "onnx":
                    session, loaded_meta = load_onnx(staged)
                    candidate: Predictor = OnnxPredictor(session, loaded_meta, source=str(out))
                else:
                    # trusted: this process wrote the file a moment ago, into its own scratch folder
                    module, loaded_meta = load_torchscript(staged, trust=True)
                    candidate = TorchScriptPredictor(module, loaded_meta, source=str(out))
        except LoadError as exc:
            raise ExportError(f"the freshly exported model does not load: {exc}") from None
        # not "parity …": that prefix is the verdict line's
        phase_name = f"checking parity ({candidate.backend} vs checkpoint)"
        with Progress(phase_name, total=len(paths), unit="images", log=log) as progress:
            reference = TorchPredictor(model, str(settings.ckpt), simplify=False)  # the module exactly as trained
            return check_parity(reference, candidate, paths, atol=float(settings.parity.atol),
                                batch_size=int(settings.parity.batch_size), num_workers=settings.parity.num_workers,
                                progress=progress)


def write_export(exported: Exported, settings: ExportSettings) -> Path:
    """Write the model file and its sidecar (with the parity figures) atomically; returns the
    sidecar's path."""
    from hymtl.fileio import atomic_write_bytes
    from hymtl.loading import write_sidecar

    meta = exported.meta
    meta["parity"] = {k: v for k, v in asdict(exported.report).items() if k not in ("batch_sizes",)}
    meta["parity"]["inputs"] = [str(getattr(i, "path", i)) for i in settings.parity_inputs]
    with phase(f"writing {printable(settings.out)}"):
        atomic_write_bytes(settings.out, exported.data)
        return write_sidecar(settings.out, meta)

"""Export a trained model to run without hymtl, and prove it gives the same answers.

``python -m hymtl.export ckpt_path=RUN/checkpoints/best.ckpt format=onnx|torchscript [out=PATH]``

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

**Parity is part of the export**: the exported model runs (ONNX Runtime / ``torch.jit.load``) on
real images next to the LightningModule, both fp32 on the same preprocessed batches (batch size
``parity.batch_size``, so a full and a partial batch exercise the dynamic batch axis). The
maximum absolute logit difference must be <= ``parity.atol`` (1e-4) and the top-1 class the
same on every image; the figures are printed. When parity breaks, nothing is written to ``out``
and the command exits with code 3. The default images are the validation split of the run's
``data.root`` (read from ``RUN/.hydra/config.yaml``); ``parity.inputs=[...]`` sets others;
they pass the same file rules as training and prediction (:func:`hymtl.inference.collect_inputs`).

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
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig, OmegaConf

from hymtl.cli import hymtl_main, run_entry
from hymtl.errors import HymtlError, first_line, printable
from hymtl.progress import Progress

if TYPE_CHECKING:
    from torch import nn

    from hymtl.inference import Predictor

log = logging.getLogger("hymtl.export")

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_EXPORTERS = ("dynamo", "torchscript")


class ExportError(HymtlError):
    """The model cannot be exported as asked (unsupported opset, no parity images, …)."""


class ParityError(ExportError):
    """The exported model does not reproduce the checkpoint's logits; nothing was written."""

    exit_code = 3  # not 2: the input was fine, the exported model is not


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


# --------------------------------------------------------------------------- exporters
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


def default_parity_inputs(ckpt_path: str | Path) -> list:
    """The validation images of the run that wrote ``ckpt_path`` (``RUN/checkpoints/x.ckpt``):
    the val folder of its ``data.root`` (:func:`hymtl.runs.trained_data_root`), or, for a label
    file or Parquet data, the samples its source names for val (else all of them: files, or the
    bytes Parquet holds); empty when that cannot be found."""
    from hymtl.data.folders import VAL_DIR_NAMES, find_classes
    from hymtl.runs import trained_data_root

    root = trained_data_root(ckpt_path)
    if root is None or not root.is_dir():
        return _source_parity_samples(ckpt_path)
    sub = {d.lower(): root / d for d in find_classes(root)}
    for name in (*VAL_DIR_NAMES, "test"):
        if name in sub:
            return [str(sub[name])]
    return [str(root)]


def _source_parity_samples(ckpt_path: str | Path) -> list:
    """The val samples (else all) of the data source a run's saved config names."""
    from hymtl.data.sources import saved_source
    from hymtl.runs import launch_dir, run_dir_of, saved_config

    run = run_dir_of(ckpt_path)
    config = saved_config(run)
    source = saved_source(config.get("data") if config is not None else None, launch_dir(run))
    if source is None:
        return []
    try:
        splits = source.load().splits
    except HymtlError:
        return []
    return list(splits.get("val") or splits.get("test") or splits.get("train") or [])


# --------------------------------------------------------------------------- the command
@contextmanager
def phase(name: str):
    """One phase of the export: a line when it starts (so a long one is not silent) and one
    with its duration when it ends."""
    log.info("%s ...", name)
    started = time.perf_counter()
    yield
    log.info("%s: done in %.1fs", name, time.perf_counter() - started)


def export(cfg: DictConfig) -> dict:
    """Export ``cfg.ckpt_path`` as ``cfg.format``, check parity, write model + sidecar; return the sidecar."""
    import torch

    from hymtl.fileio import atomic_write_bytes
    from hymtl.inference import OnnxPredictor, Skipped, TorchPredictor, TorchScriptPredictor, collect_inputs
    from hymtl.loading import (
        LoadError, export_metadata, load_checkpoint, load_onnx, load_torchscript, sha256_bytes, write_sidecar,
    )

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ExportError("ckpt_path= is required (python -m hymtl.export ckpt_path=CKPT format=onnx)")
    if cfg.format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else ckpt.with_suffix(FORMATS[cfg.format])
    if out.resolve() == ckpt.resolve():
        raise ExportError(f"out={printable(out)} would overwrite the checkpoint")

    inputs = list(cfg.parity.inputs) if cfg.parity.get("inputs") else default_parity_inputs(ckpt)
    if not inputs:
        raise ExportError(
            "parity needs real images and the run's data folder was not found: pass parity.inputs=[FOLDER or FILES]"
        )
    if all(isinstance(i, str) for i in inputs):
        paths, missing = collect_inputs(inputs)
    else:  # the samples of the run's source (a label file's files, Parquet's bytes): checked as training checks them
        from hymtl.data.images import check_files

        reasons = check_files(inputs)
        paths, missing = [i for i in inputs if i.path not in reasons], [Skipped(p, r) for p, r in reasons.items()]
    if cfg.parity.get("max_images"):
        paths = paths[: int(cfg.parity.max_images)]
    if not paths:
        raise ExportError(f"no parity images in {printable(inputs)} ({'; '.join(printable(s.reason) for s in missing)})")

    with phase(f"reading checkpoint {printable(ckpt)}"):
        model = load_checkpoint(ckpt)
    meta = export_metadata(
        model.class_names, model.preprocessing, cfg.format, task=model.task.describe(),
        thresholds=model.thresholds.tolist() if model.thresholds is not None else None,
        backbone=model.hparams.backbone, source_checkpoint=ckpt.name,
        source_sha256=sha256_bytes(ckpt.read_bytes()), torch_version=torch.__version__,
    )
    if cfg.format == "onnx":
        meta.update(opset=int(cfg.onnx.opset), exporter=str(cfg.onnx.exporter), dynamic_axes={"images": [0], "logits": [0]})
        with phase(f"exporting to ONNX ({cfg.onnx.exporter} exporter, opset {cfg.onnx.opset}; about a minute on a CPU)"):
            data = onnx_bytes(model, meta, opset=cfg.onnx.opset, exporter=cfg.onnx.exporter)
    else:
        meta.update(dynamic_axes={"images": [0], "logits": [0]})
        with phase("tracing to TorchScript"):
            data = torchscript_bytes(model, meta)

    # Load the export back through the same safe loaders users get, from a scratch folder.
    with tempfile.TemporaryDirectory(prefix=".hymtl-export.") as tmp:
        staged = Path(tmp) / out.name
        staged.write_bytes(data)
        write_sidecar(staged, meta)
        try:
            with phase("loading the export back (hymtl.loading)"):
                if cfg.format == "onnx":
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
            reference = TorchPredictor(model, str(ckpt), simplify=False)  # the module exactly as trained
            report = check_parity(reference, candidate, paths, atol=float(cfg.parity.atol),
                                  batch_size=int(cfg.parity.batch_size), num_workers=cfg.parity.num_workers,
                                  progress=progress)
    print(report.line())
    if not report.ok:
        raise ParityError(f"parity check failed, nothing written to {printable(out)}: {report.line()}")

    meta["parity"] = {k: v for k, v in asdict(report).items() if k not in ("batch_sizes",)}
    meta["parity"]["inputs"] = [str(getattr(i, "path", i)) for i in inputs]
    with phase(f"writing {printable(out)}"):
        atomic_write_bytes(out, data)
        side = write_sidecar(out, meta)
    print(f"wrote {printable(out)} ({len(data) / 1e6:.1f} MB) and {side.name}")
    return json.loads(side.read_text())


@hymtl_main("export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: ``error: ...`` and exit 2 on bad input, exit 3 when parity breaks."""
    run_entry(export, cfg, phase="the export", stopped="no model file or sidecar was written (each is written "
              "whole, after the parity check, or not at all) and the scratch folder is removed: run it again")


if __name__ == "__main__":
    main()

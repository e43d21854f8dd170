"""Safe loading of everything a trained model travels as: checkpoints, exported models, sidecars.

Every loader here either returns something usable or raises :class:`LoadError` with one line
that names the file and what is wrong with it — a truncated, tampered or foreign file never
ends in a traceback and never runs code.

* **Checkpoints** (Lightning ``.ckpt`` of :class:`~hymtl.model.TransferModule`) are read once
  with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which rebuilds only
  tensors and plain containers and refuses any other global (``os.system``, a ``__reduce__``
  payload…) before calling it. The hyperparameters are the checkpoint's plain
  ``hyper_parameters`` dict (the module saves only plain containers for that reason); the module
  is rebuilt from them with ``pretrained=False`` (the weights come from the checkpoint, not from
  a download) and its ``state_dict`` is loaded strictly, so missing, extra or mis-shaped tensors
  are caught, and so are non-finite weights.
* **Exported models** (``.onnx``, TorchScript ``.pt``) come with a JSON **sidecar**
  (``<model file>.json``) holding the class names, the preprocessing and the SHA-256 of the
  model file: a model file changed after export fails the checksum. ONNX files also carry the
  same metadata inside (``metadata_props["hymtl"]``), so an ``.onnx`` without its sidecar still
  loads; it is then checked by ``onnx.checker`` and by ONNX Runtime itself.

Imports only downward: errors, fileio, backbones, model.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from hymtl.backbones import Preprocessing
from hymtl.errors import HymtlError, first_line
from hymtl.fileio import atomic_write_json

SIDECAR_FORMAT = "hymtl-export"
SIDECAR_VERSION = 1
ONNX_METADATA_KEY = "hymtl"
TORCHSCRIPT_METADATA_FILE = "hymtl.json"  # in the TorchScript archive's extra files
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes; anything huge is not ours


class LoadError(HymtlError):
    """A checkpoint, exported model or sidecar that is missing, truncated, tampered or foreign."""


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise LoadError(f"{what} not found: {path}")
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- checkpoints
def _check_zip(path: Path) -> None:
    """Every member of the checkpoint's zip archive against its CRC-32.

    ``torch.load`` does not verify CRCs, so flipped bytes inside a tensor would load silently as
    wrong weights; the archive's own checksums catch them (and truncation) first.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise LoadError(
            f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint ({first_line(exc)})"
        ) from None
    if damaged is not None:
        raise LoadError(f"cannot read checkpoint {path}: {damaged} fails its CRC check (the file was damaged or edited)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True``; :class:`LoadError` for anything else."""
    path = _existing_file(path, "checkpoint")
    _check_zip(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights-only refusals ("Trying to load unsupported GLOBAL posix.system ...") and corrupt pickles
        refused = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            name = (refused.group(1) or refused.group(2)).rstrip(".,")
            raise LoadError(
                f"refusing to load checkpoint {path}: it asks to call {name}, which weights-only loading does not "
                "allow (a checkpoint that runs code when unpickled; not made by hymtl or tampered with)"
            ) from None
        raise LoadError(f"cannot read checkpoint {path}: corrupt pickle data ({first_line(exc, 200)})") from None
    except Exception as exc:
        raise LoadError(
            f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint ({first_line(exc, 200)})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) \
            or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise LoadError(f"{path} is not a Lightning checkpoint of a hymtl model (no state_dict/hyper_parameters)")
    return checkpoint


def _checked_hparams(hparams: dict, path: Path) -> dict[str, Any]:
    from hymtl.model import TransferModule

    backbone, names, n = hparams.get("backbone"), hparams.get("class_names"), hparams.get("num_classes")
    if not isinstance(backbone, str) or not backbone:
        raise LoadError(f"checkpoint {path} names no backbone in its hyperparameters")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise LoadError(f"checkpoint {path} has an invalid num_classes: {n!r}")
    if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(c, str) and c for c in names) \
            or len(set(names)) != n:
        raise LoadError(f"checkpoint {path}: class_names {names!r} are not {n} distinct names")
    accepted = set(inspect.signature(TransferModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    # the weights are in the checkpoint: never download or read a weights file to build the module
    kwargs.update(pretrained=False, weights_path=None, class_names=list(names))
    return kwargs


def load_checkpoint(path: str | os.PathLike):
    """A :class:`~hymtl.model.TransferModule` from a Lightning checkpoint, in eval mode, fp32, on CPU.

    No code from the file runs (see the module docstring). Raises :class:`LoadError`.
    """
    from hymtl.model import TransferModule

    checkpoint = read_checkpoint(path)
    path = Path(os.path.expanduser(str(path)))
    kwargs = _checked_hparams(checkpoint["hyper_parameters"], path)
    state_dict = checkpoint["state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise LoadError(f"checkpoint {path}: state_dict holds values that are not tensors")
    try:
        model = TransferModule(**kwargs)
    except HymtlError as exc:
        raise LoadError(f"checkpoint {path}: {exc}") from None
    except Exception as exc:  # a tampered hyperparameter of the wrong type
        raise LoadError(f"checkpoint {path}: invalid hyperparameters ({first_line(exc)})") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise LoadError(
            f"checkpoint {path}: weights do not fit its {kwargs['backbone']} model ({detail[:300]})"
        ) from None
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoadError(f"checkpoint {path}: non-finite weights in {len(bad)} tensors (e.g. {bad[0]})")
    model.float().eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- sidecars / metadata
def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (an .onnx and a .pt of one checkpoint do not collide)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def export_metadata(
    class_names: list[str], preprocessing: Preprocessing, model_format: str, **extra: Any
) -> dict[str, Any]:
    """The description of an exported model, enough to use it without hymtl.

    ``preprocessing``: decode to RGB, resize the shorter side to ``resize_size`` with
    ``interpolation``, center-crop ``input_size``, scale to [0, 1], subtract ``mean``, divide by
    ``std``; NCHW float32. The model's output is ``logits`` (softmax not applied).
    """
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model_format": model_format,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "preprocessing": {**preprocessing.as_dict(), "crop": "center"},
        "input_name": "images",
        "output_name": "logits",
        **extra,
    }


def validate_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Check a sidecar/metadata dict field by field; return it (``LoadError`` naming ``source``)."""

    def fail(why: str) -> LoadError:
        return LoadError(f"{source}: {why}")

    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise fail(f"not a hymtl export description (no \"format\": \"{SIDECAR_FORMAT}\")")
    if meta.get("version") != SIDECAR_VERSION:
        raise fail(f"unsupported version {meta.get('version')!r} (this hymtl reads {SIDECAR_VERSION})")
    names, n = meta.get("class_names"), meta.get("num_classes")
    if not isinstance(names, list) or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise fail("class_names must be a list of distinct, non-empty strings")
    if len(names) < 2 or n != len(names):
        raise fail(f"num_classes {n!r} does not match the {len(names)} class_names")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise fail("no preprocessing")
    for key in ("input_size", "resize_size"):
        value = pre.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 8192:
            raise fail(f"preprocessing.{key} must be an integer pixel size, got {value!r}")
    if pre["resize_size"] < pre["input_size"]:
        raise fail("preprocessing.resize_size is smaller than the crop (input_size)")
    for key in ("mean", "std"):
        value = pre.get(key)
        if not isinstance(value, list) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise fail(f"preprocessing.{key} must be three finite numbers, got {value!r}")
    if not all(v > 0 for v in pre["std"]):
        raise fail("preprocessing.std must be positive")
    if pre.get("interpolation") not in INTERPOLATIONS:
        raise fail(f"preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if pre.get("crop", "center") != "center":
        raise fail(f"unsupported crop {pre.get('crop')!r}")
    sha = meta.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise fail("sha256 must be a 64-character hex digest")
    return meta


def metadata_preprocessing(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def write_sidecar(model_path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``<model>.json`` atomically, with the SHA-256 of the model file as it is now."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    atomic_write_json(path, {**meta, "model_file": model_path.name, "sha256": digest})
    return path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """A validated sidecar dict. Raises :class:`LoadError` for truncated or tampered JSON."""
    path = _existing_file(path, "sidecar")
    if path.stat().st_size > _MAX_SIDECAR_BYTES:
        raise LoadError(f"sidecar {path} is too large to be a hymtl sidecar")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"sidecar {path} is not valid JSON (truncated or edited?): {first_line(exc)}") from None
    meta = validate_metadata(meta, f"sidecar {path}")
    if not meta.get("sha256"):
        raise LoadError(f"sidecar {path} has no sha256 of its model file")
    return meta


def _model_bytes_and_meta(path: Path, what: str) -> tuple[bytes, dict[str, Any] | None]:
    """Read a model file and, when its sidecar exists, check the file against the sidecar's digest."""
    data = path.read_bytes()
    side = sidecar_path(path)
    if not side.is_file():
        return data, None
    meta = read_sidecar(side)
    if meta.get("sha256") and sha256_bytes(data) != meta["sha256"]:
        raise LoadError(
            f"{what} {path} does not match its sidecar {side.name} (SHA-256 differs): "
            "the file was changed or damaged after export"
        )
    return data, meta


# --------------------------------------------------------------------------- ONNX
def load_onnx(path: str | os.PathLike, providers: list[str] | None = None):
    """``(onnxruntime.InferenceSession, metadata)`` for an exported ``.onnx``; :class:`LoadError` if unusable.

    Metadata come from the sidecar (checksum verified) or, without one, from the model's own
    ``metadata_props``. The graph is checked by ``onnx.checker`` and its input/output shapes
    against the metadata before a session is returned.
    """
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    path = _existing_file(path, "ONNX model")
    data, meta = _model_bytes_and_meta(path, "ONNX model")
    try:
        proto = onnx.load_model_from_string(data)
        onnx.checker.check_model(proto)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise LoadError(f"cannot read ONNX model {path}: truncated, corrupt or invalid ({first_line(exc)})") from None
    if meta is None:
        props = {p.key: p.value for p in proto.metadata_props}
        if ONNX_METADATA_KEY not in props:
            raise LoadError(
                f"ONNX model {path} has neither a sidecar ({sidecar_path(path).name}) nor hymtl metadata; "
                "export it with python -m hymtl.export"
            )
        try:
            meta = json.loads(props[ONNX_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise LoadError(f"ONNX model {path}: its hymtl metadata is not valid JSON ({first_line(exc)})") from None
        meta = validate_metadata(meta, f"ONNX model {path} (metadata)")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, …)
        raise LoadError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = meta["preprocessing"]["input_size"]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or list(inputs[0].shape[1:]) != [3, size, size]:
        raise LoadError(f"ONNX model {path}: input {[i.shape for i in inputs]} is not (batch, 3, {size}, {size})")
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[1] != meta["num_classes"]:
        raise LoadError(f"ONNX model {path}: output {[o.shape for o in outputs]} does not give {meta['num_classes']} logits")
    return session, meta


# --------------------------------------------------------------------------- TorchScript
def load_torchscript(path: str | os.PathLike):
    """``(ScriptModule, metadata)`` for an exported TorchScript file; :class:`LoadError` if unusable.

    TorchScript is a program, not only weights: it is loaded only when its sidecar exists and
    the file's SHA-256 matches it (that is, the file is the one ``hymtl.export`` wrote).
    """
    path = _existing_file(path, "TorchScript model")
    if not sidecar_path(path).is_file():
        raise LoadError(
            f"TorchScript model {path} has no sidecar ({sidecar_path(path).name}); "
            "only files written by python -m hymtl.export are loaded"
        )
    data, meta = _model_bytes_and_meta(path, "TorchScript model")
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export; the file format is still what C++ loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"cannot read TorchScript model {path}: truncated or corrupt ({first_line(exc)})") from None
    module.eval()
    return module, meta

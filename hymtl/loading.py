"""Safe loading of everything a trained model travels as: checkpoints, exported models, sidecars.

Every loader here either returns something usable or raises :class:`LoadError` with one line
that names the file and what is wrong with it — a truncated, tampered or foreign file never
ends in a traceback and never runs code.

* **Checkpoints** (Lightning ``.ckpt`` of :class:`~hymtl.model.TransferModule`) are read once
  with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which rebuilds only
  tensors and plain containers and refuses any other global (``os.system``, a ``__reduce__``
  payload…) before calling it. The hyperparameters are the checkpoint's plain
  ``hyper_parameters`` dict (the module saves only plain containers for that reason), checked
  to describe a model (:func:`checked_description`); the tensors are checked against the shapes
  of the model described and for non-finite values (:func:`check_weights`). Building the module
  is the model's room (:func:`hymtl.model.load_checkpoint`): this module returns verified
  weights and plain metadata.
* **Exported models**: an ``.onnx`` is a graph of standard operators that ONNX Runtime
  runs; it carries its own description (class names, preprocessing) in
  ``metadata_props["hymtl"]``. A TorchScript ``.pt`` is a *program*: loading it can run its
  ``__setstate__`` and running it can read and write files (``torch.from_file``…). It is
  therefore loaded only when the caller says it trusts the file (``trust=True``; the entry
  points' ``trust_model=true``) and refused otherwise, whatever its name or sidecar says; its
  description is the archive's own ``extra/hymtl.json``, read from the zip without running
  anything. A file that *is* a TorchScript archive is refused as a checkpoint too, whatever
  its suffix.
* **Sidecars** (``<model file>.json``) are a copy of the description for tools without hymtl.
  They are checked field by field, and the model file's SHA-256 they hold catches a model and a
  sidecar that are not a pair (an edit, a damaged copy, a mix-up). That checksum is **no proof
  of origin**: whoever sends a model can send a sidecar that matches it. So a sidecar never
  decides what a model means: when it disagrees with the model file's own description (class
  names, their number, the preprocessing) the load is refused; the model's description is
  what is used.

A primitive: imports errors, fileio and backbones (a preprocessing description), no service.
"""

from __future__ import annotations

import errno
import hashlib
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
from hymtl.errors import HymtlError, first_line, printable
from hymtl.fileio import atomic_write_json, read_regular_file, regular_file_problem

SIDECAR_FORMAT = "hymtl-export"
SIDECAR_VERSION = 1
#: a multi-label model's description: readers of version 1 (which apply a softmax and take the
#: top class) refuse it, instead of reading label sets as one label
MULTILABEL_SIDECAR_VERSION = 2
READABLE_VERSIONS = (SIDECAR_VERSION, MULTILABEL_SIDECAR_VERSION)
ONNX_METADATA_KEY = "hymtl"
TORCHSCRIPT_METADATA_FILE = "hymtl.json"  # in the TorchScript archive's extra files
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes; anything huge is not ours


class LoadError(HymtlError):
    """A checkpoint, exported model or sidecar that is missing, truncated, tampered or foreign."""


#: the longest an error line quotes from a file's own content (class names, library messages)
MAX_QUOTED = 300


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` (``~`` expanded) when it is a regular file (:func:`hymtl.fileio.regular_file_problem`:
    the rule of images too), else :class:`LoadError` — before anything opens it: a FIFO would
    block forever, a link to ``/dev/zero`` be read without end."""
    path = Path(os.path.expanduser(str(path)))
    problem = regular_file_problem(path)
    if problem == "no such file":
        raise LoadError(f"{what} not found: {printable(path)}")
    if problem is not None:
        raise LoadError(f"{what} {printable(path)}: {problem} (a FIFO, device, socket or folder is never opened)")
    return path


def check_model_file(path: str | os.PathLike, what: str = "model file") -> Path:
    """The file rule of every model file (``.ckpt``, ``.onnx``, ``.pt``, sidecars): ``path``
    when it is a regular file, else :class:`LoadError`. Run before any format sniffing."""
    return _existing_file(path, what)


def _read_model_file(path: Path, what: str) -> bytes:
    """The bytes of a checked model file, read once, from a descriptor that is a regular file
    (the path may have been swapped for a FIFO since the check)."""
    try:
        return read_regular_file(path)
    except OSError as exc:
        raise LoadError(f"cannot read {what} {printable(path)}: {exc.strerror or exc}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- checkpoints
def _check_zip(path: Path, data: bytes) -> None:
    """Every member of the checkpoint's zip archive (``data``, the bytes of ``path``) against its CRC-32.

    ``torch.load`` does not verify CRCs, so flipped bytes inside a tensor would load silently as
    wrong weights; the archive's own checksums catch them (and truncation) first.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise LoadError(
            f"cannot read checkpoint {printable(path)}: truncated, corrupt or not a PyTorch checkpoint ({first_line(exc, MAX_QUOTED)})"
        ) from None
    if damaged is not None:
        raise LoadError(f"cannot read checkpoint {printable(path)}: {printable(damaged)[:MAX_QUOTED]} fails its CRC check "
                        "(the file was damaged or edited)")


def is_torchscript_archive(path: str | os.PathLike | bytes) -> bool:
    """Whether ``path`` (or a file's bytes) is a TorchScript archive (a zip holding
    ``<name>/constants.pkl`` and ``<name>/code/``), told from its member names alone: nothing in
    it is read or run. Only a regular file is opened (a FIFO or device is not an archive)."""
    if isinstance(path, bytes):
        source: Any = io.BytesIO(path)
    elif regular_file_problem(path) is not None:
        return False
    else:
        source = path
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _refuse_untrusted_torchscript(path: Path) -> LoadError:
    return LoadError(
        f"refusing to load TorchScript model {printable(path)}: TorchScript is a program that can read and write "
        "files when it is loaded or run, and nothing in or beside it (not its sidecar's SHA-256) shows who made it; "
        "use the model's .onnx export, or pass trust_model=true if you trust where this file came from"
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True``; :class:`LoadError` for anything else
    (a TorchScript archive included, whatever its name: it would be a program, not weights)."""
    return checked_checkpoint(read_weights_file(path), path)


def checked_checkpoint(checkpoint: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``checkpoint`` (:func:`read_weights_file`'s) if it is a Lightning checkpoint of a hymtl
    model (a ``state_dict`` and ``hyper_parameters``), else :class:`LoadError`."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) \
            or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise LoadError(f"{printable(path)} is not a Lightning checkpoint of a hymtl model (no state_dict/hyper_parameters)")
    return checkpoint


def read_weights_file(path: str | os.PathLike) -> Any:
    """What a PyTorch file holds, read by the same rules as a checkpoint (a regular file, read
    once, every zip member against its CRC, no TorchScript, ``weights_only=True``), whatever its
    layout: also the bare state dict Lightning's spawn launcher hands from a worker to the main
    process. :class:`LoadError` for anything else."""
    path = _existing_file(path, "checkpoint")
    data = _read_model_file(path, "checkpoint")  # read once: what is checked is what is loaded
    _check_zip(path, data)
    if is_torchscript_archive(data):
        raise LoadError(f"refusing to read {printable(path)} as a checkpoint: it is a TorchScript program, not "
                        "weights (a .pt export is loaded only with trust_model=true)")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights-only refusals ("Trying to load unsupported GLOBAL posix.system ...") and corrupt pickles
        refused = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            name = (refused.group(1) or refused.group(2)).rstrip(".,")
            raise LoadError(
                f"refusing to load checkpoint {printable(path)}: it asks to call {printable(name)[:MAX_QUOTED]}, which weights-only loading does not "
                "allow (a checkpoint that runs code when unpickled; not made by hymtl or tampered with)"
            ) from None
        raise LoadError(f"cannot read checkpoint {printable(path)}: corrupt pickle data ({first_line(exc, 200)})") from None
    except Exception as exc:
        raise LoadError(
            f"cannot read checkpoint {printable(path)}: truncated, corrupt or not a PyTorch checkpoint ({first_line(exc, 200)})"
        ) from None
    return checkpoint


def checked_description(hparams: dict, path: str | os.PathLike) -> dict[str, Any]:
    """The plain hyperparameters of a checkpoint (its ``hyper_parameters``), once they describe a
    model at all: a backbone name, ``num_classes`` >= 2 and as many distinct class names.
    :class:`LoadError` otherwise. Building the module they describe is the model's
    (:func:`hymtl.model.verified_module_kwargs`)."""
    path = Path(os.path.expanduser(str(path)))
    backbone, names, n = hparams.get("backbone"), hparams.get("class_names"), hparams.get("num_classes")
    if not isinstance(backbone, str) or not backbone:
        raise LoadError(f"checkpoint {printable(path)} names no backbone in its hyperparameters")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise LoadError(f"checkpoint {printable(path)} has an invalid num_classes: {printable(repr(n))[:MAX_QUOTED]}")
    if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(c, str) and c for c in names) \
            or len(set(names)) != n:
        shown = printable(repr(names))
        shown = shown if len(shown) <= MAX_QUOTED else f"{shown[:MAX_QUOTED]}… ({len(names) if isinstance(names, (list, tuple)) else '?'} items)"
        raise LoadError(f"checkpoint {printable(path)}: class_names {shown} are not {n} distinct names")
    return {**hparams, "class_names": list(names)}


def checked_tensors(state_dict: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``state_dict`` when every value in it is a tensor, else :class:`LoadError`."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise LoadError(f"checkpoint {printable(Path(os.path.expanduser(str(path))))}: state_dict holds values that "
                        "are not tensors")
    return state_dict


def check_weights(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  path: str | os.PathLike, backbone: str, num_classes: Any) -> None:
    """The tensors of a checkpoint against the shapes its described model has (``expected``,
    name -> shape: what the model's room computes without allocating anything), and every
    floating-point tensor finite. :class:`LoadError` naming the first difference otherwise: a
    file cannot ask for more memory than it holds, and a non-finite weight is a damaged file."""
    path = Path(os.path.expanduser(str(path)))
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        if wrong:
            key = wrong[0]
            detail = (f"{printable(key)[:MAX_QUOTED]} holds {tuple(state_dict[key].shape)} where its description "
                      f"({backbone}, {num_classes} classes) needs {expected[key]}")
        else:
            key = (missing or unexpected)[0]
            detail = f"{'no' if missing else 'an unexpected'} tensor {printable(key)[:MAX_QUOTED]}"
        raise LoadError(f"checkpoint {printable(path)}: weights do not fit its {backbone} model as described "
                        f"({detail}; {len(wrong)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected): "
                        "damaged, edited or not made by this hymtl; refused before building anything")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoadError(f"checkpoint {printable(path)} is damaged: non-finite weights in {len(bad)} tensors "
                        f"(e.g. {printable(bad[0])[:MAX_QUOTED]}): nan or inf stored in the file")


# --------------------------------------------------------------------------- sidecars / metadata
def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (an .onnx and a .pt of one checkpoint do not collide)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def export_metadata(
    class_names: list[str], preprocessing: Preprocessing, model_format: str, task: dict[str, Any] | None = None,
    thresholds: list[float] | None = None, **extra: Any
) -> dict[str, Any]:
    """The description of an exported model, enough to use it without hymtl.

    ``preprocessing``: decode to RGB, resize the shorter side to ``resize_size`` with
    ``interpolation``, center-crop ``input_size``, scale to [0, 1], subtract ``mean``, divide by
    ``std``; NCHW float32. The model's output is ``logits``; ``output_activation`` says what
    turns them into probabilities: ``softmax`` (one label per image, ``task.name`` multiclass) or
    ``sigmoid`` per label (``multilabel``: every label whose probability reaches its entry of
    ``thresholds`` applies; version 2, which readers of version 1 refuse).
    """
    task = dict(task or {"name": "multiclass"})
    multilabel = task.get("name") == "multilabel"
    meta = {
        "format": SIDECAR_FORMAT,
        "version": MULTILABEL_SIDECAR_VERSION if multilabel else SIDECAR_VERSION,
        "model_format": model_format,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "preprocessing": {**preprocessing.as_dict(), "crop": "center"},
        "input_name": "images",
        "output_name": "logits",
        "task": task,
        "output_activation": "sigmoid" if multilabel else "softmax",
        **extra,
    }
    if multilabel:
        meta["thresholds"] = [float(t) for t in thresholds] if thresholds is not None else None
    return meta


def validate_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Check a sidecar/metadata dict field by field; return it (``LoadError`` naming ``source``)."""

    def fail(why: str) -> LoadError:
        return LoadError(f"{source}: {why}")

    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise fail(f"not a hymtl export description (no \"format\": \"{SIDECAR_FORMAT}\")")
    if meta.get("version") not in READABLE_VERSIONS:
        raise fail(f"unsupported version {meta.get('version')!r} (this hymtl reads "
                   f"{', '.join(map(str, READABLE_VERSIONS))})")
    names, n = meta.get("class_names"), meta.get("num_classes")
    if not isinstance(names, list) or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
        raise fail("class_names must be a list of distinct, non-empty strings")
    if not all(_encodable(c) for c in names):
        raise fail("class_names must be valid Unicode text")
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
    _check_task(meta, len(names), fail)
    return meta


def _check_task(meta: dict[str, Any], n: int, fail) -> None:
    """The task of a description (none: multi-class, what version 1 meant) and, for multi-label,
    one threshold in (0, 1) per label."""
    from hymtl.tasks import TASKS

    task = meta.get("task", {"name": "multiclass"})
    if not isinstance(task, dict) or task.get("name") not in TASKS:
        raise fail(f"task must name one of {', '.join(TASKS)}, got {printable(task)}")
    multilabel = task["name"] == "multilabel"
    if multilabel != (meta.get("version") == MULTILABEL_SIDECAR_VERSION):
        raise fail(f"a {task['name']} model's description has version "
                   f"{MULTILABEL_SIDECAR_VERSION if multilabel else SIDECAR_VERSION}, got {meta.get('version')!r}")
    if multilabel:
        cuts = meta.get("thresholds")
        if not isinstance(cuts, list) or len(cuts) != n or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in cuts):
            raise fail(f"thresholds must be {n} numbers in (0, 1), one per label")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\udcff" in JSON): not text any output can hold
        return False
    return True


# what a model means: a sidecar that says otherwise than the model file is refused
MEANING_KEYS = ("class_names", "num_classes", "preprocessing", "task", "thresholds")


def model_description(own: dict[str, Any] | None, sidecar: dict[str, Any] | None, path: Path, what: str) -> dict[str, Any]:
    """The description of a model: its file's own (``own``), completed by the sidecar's other
    fields (parity figures, checksum); :class:`LoadError` when the sidecar disagrees with the
    file on any of :data:`MEANING_KEYS`. Without a description of its own, the sidecar's."""
    if own is None:
        if sidecar is None:
            raise LoadError(f"{what} {printable(path)} has neither a sidecar ({printable(sidecar_path(path).name)}) "
                            "nor hymtl metadata; export it with python -m hymtl.export")
        return sidecar
    if sidecar is None:
        return own
    differs = [k for k in MEANING_KEYS if _comparable(sidecar.get(k), k) != _comparable(own.get(k), k)]
    if differs:
        key = differs[0]
        raise LoadError(
            f"sidecar {printable(sidecar_path(path).name)} contradicts the model file {printable(path)} on "
            f"{', '.join(differs)} (sidecar {printable(sidecar.get(key))}, model {printable(own.get(key))}): a sidecar "
            "cannot change what a model means; remove or regenerate the sidecar"
        )
    return {**sidecar, **own}


def _comparable(value: Any, key: str) -> Any:
    if key == "preprocessing" and isinstance(value, dict):
        return {"crop": "center", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}}
    return value


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
    try:
        raw = read_regular_file(path, max_bytes=_MAX_SIDECAR_BYTES)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise LoadError(f"sidecar {printable(path)} is too large to be a hymtl sidecar") from None
        raise LoadError(f"cannot read sidecar {printable(path)}: {exc.strerror or exc}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"sidecar {printable(path)} is not valid JSON (truncated or edited?): {first_line(exc, MAX_QUOTED)}") from None
    meta = validate_metadata(meta, f"sidecar {printable(path)}")
    if not meta.get("sha256"):
        raise LoadError(f"sidecar {printable(path)} has no sha256 of its model file")
    return meta


def _model_bytes_and_meta(path: Path, what: str) -> tuple[bytes, dict[str, Any] | None]:
    """Read a model file and, when its sidecar exists, check the file against the sidecar's digest."""
    data = _read_model_file(path, what)
    side = sidecar_path(path)
    if not os.path.lexists(side):
        return data, None
    meta = read_sidecar(side)
    if meta.get("sha256") and sha256_bytes(data) != meta["sha256"]:
        raise LoadError(
            f"{what} {printable(path)} does not match its sidecar {printable(side.name)} (SHA-256 differs): they are "
            "not a pair from one export, or one of them was changed or damaged since"
        )
    return data, meta


# --------------------------------------------------------------------------- ONNX
def load_onnx(path: str | os.PathLike, providers: list[str] | None = None):
    """``(onnxruntime.InferenceSession, metadata)`` for an exported ``.onnx``; :class:`LoadError` if unusable.

    The metadata are the model's own ``metadata_props["hymtl"]``; a sidecar, when there is one,
    must be the model's pair (SHA-256) and agree with them (:func:`model_description`). The
    graph is checked by ``onnx.checker`` and its input/output shapes against the metadata
    before a session is returned.
    """
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    path = _existing_file(path, "ONNX model")
    data, side_meta = _model_bytes_and_meta(path, "ONNX model")
    try:
        proto = onnx.load_model_from_string(data)
        onnx.checker.check_model(proto)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise LoadError(f"cannot read ONNX model {printable(path)}: truncated, corrupt or invalid "
                        f"({first_line(exc, MAX_QUOTED)})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    own = None
    if ONNX_METADATA_KEY in props:
        try:
            own = json.loads(props[ONNX_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise LoadError(f"ONNX model {printable(path)}: its hymtl metadata is not valid JSON "
                            f"({first_line(exc, MAX_QUOTED)})") from None
        own = validate_metadata(own, f"ONNX model {printable(path)} (metadata)")
    meta = model_description(own, side_meta, path, "ONNX model")
    _check_onnx_sizes(proto, path, meta["preprocessing"]["input_size"])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, …)
        raise LoadError(f"ONNX Runtime cannot load {printable(path)}: {first_line(exc, MAX_QUOTED)}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = meta["preprocessing"]["input_size"]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or list(inputs[0].shape[1:]) != [3, size, size]:
        raise LoadError(f"ONNX model {printable(path)}: input {[i.shape for i in inputs]} is not (batch, 3, {size}, {size})")
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[1] != meta["num_classes"]:
        raise LoadError(f"ONNX model {printable(path)}: output {[o.shape for o in outputs]} does not give {meta['num_classes']} logits")
    return session, meta


#: the most elements one tensor of an ONNX graph may declare per image, in units of the input
#: image's elements (3·S²), with a floor: a classifier's largest activation is a few times its
#: input (lite0 at 224: 32·112² ≈ 0.13·(3·224²)); a 40000² ConstantOfShape (7 GB) is not
ONNX_MAX_INPUT_MULTIPLE = 16
ONNX_MIN_ELEMENT_BOUND = 1 << 26


def _check_onnx_sizes(proto, path: Path, input_size: int) -> None:
    """Refuse a graph that declares a tensor of more than ``max(ONNX_MIN_ELEMENT_BOUND,
    ONNX_MAX_INPUT_MULTIPLE · 3 · input_size²)`` elements (the batch axis and other symbolic
    dimensions count as 1), before ONNX Runtime allocates it. Shapes come from ONNX's shape inference with data propagation, so a shape computed
    from constants (``ConstantOfShape(Constant([40000, 40000]))``) is known; an inference
    failure is an invalid model."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx's InferenceError and friends
        raise LoadError(f"cannot read ONNX model {printable(path)}: its shapes do not check "
                        f"({first_line(exc, MAX_QUOTED)})") from None
    bound = max(ONNX_MIN_ELEMENT_BOUND, ONNX_MAX_INPUT_MULTIPLE * 3 * input_size * input_size)
    graph = inferred.graph
    for value in [*graph.value_info, *graph.output, *graph.input]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        elements = math.prod(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
        if elements > bound:
            raise LoadError(f"ONNX model {printable(path)}: tensor {printable(value.name)[:MAX_QUOTED]} declares "
                            f"{elements:,} elements per image (more than {bound:,} for {input_size}x{input_size} "
                            "inputs): refused before running it (a hymtl export never needs that much)")


# --------------------------------------------------------------------------- TorchScript
def _torchscript_own_metadata(path: Path, data: bytes) -> dict[str, Any] | None:
    """The archive's ``extra/hymtl.json`` (written by ``hymtl.export``), read as a zip member
    with every member's CRC checked: no TorchScript code is loaded to read it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
            member = next((n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}")), None)
            raw = archive.read(member) if member and damaged is None else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise LoadError(f"cannot read TorchScript model {printable(path)}: truncated or corrupt "
                        f"({first_line(exc, MAX_QUOTED)})") from None
    if damaged is not None:
        raise LoadError(f"cannot read TorchScript model {printable(path)}: truncated or corrupt "
                        f"({printable(damaged)} fails its CRC check)")
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"TorchScript model {printable(path)}: its hymtl metadata is not valid JSON "
                        f"({first_line(exc, MAX_QUOTED)})") from None
    return validate_metadata(meta, f"TorchScript model {printable(path)} (metadata)")


def load_torchscript(path: str | os.PathLike, trust: bool = False):
    """``(ScriptModule, metadata)`` for an exported TorchScript file; :class:`LoadError` if unusable.

    TorchScript is a program, not only weights (see the module docstring): without
    ``trust=True`` it is refused before a byte of it is loaded. With it, the archive is CRC
    checked, its own description (``extra/hymtl.json``) read and compared with the sidecar,
    and only then loaded.
    """
    path = _existing_file(path, "TorchScript model")
    if not trust:
        raise _refuse_untrusted_torchscript(path)
    data, side_meta = _model_bytes_and_meta(path, "TorchScript model")
    meta = model_description(_torchscript_own_metadata(path, data), side_meta, path, "TorchScript model")
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export; the file format is still what C++ loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"cannot read TorchScript model {printable(path)}: truncated or corrupt "
                        f"({first_line(exc, MAX_QUOTED)})") from None
    module.eval()
    return module, meta

"""Every loader gets truncated, tampered and hostile files: one clear LoadError each, no code run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, entry_command
from hymtl.loading import (
    LoadError,
    load_onnx,
    load_torchscript,
    read_sidecar,
    sha256_bytes,
    sidecar_path,
)
from hymtl.model import load_checkpoint
from test_predict import compose_app


class CodeOnUnpickle:
    """Unpickling this runs ``exec``: it creates ``marker`` (a harmless stand-in for an attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _save_variant(tiny_checkpoint: Path, dest: Path, change) -> Path:
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, dest)
    return dest


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_checkpoint_that_runs_code_on_unpickling_is_refused_and_never_runs(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = _save_variant(tiny_checkpoint, tmp_path / "evil.ckpt",
                         lambda c: c["hyper_parameters"].update(note=CodeOnUnpickle(marker)))

    with pytest.raises(LoadError, match=r"refusing to load checkpoint .*evil\.ckpt: it asks to call (builtins\.)?exec,"):
        load_checkpoint(evil)
    assert not marker.exists()

    # the entry point: one line, exit 2, still nothing ran
    result = subprocess.run([*entry_command("hymtl.predict"), f"ckpt_path={evil}",
                             f"inputs=[{tiny_checkpoint.parent / 'images' / 'val'}]"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: refusing to load checkpoint")
    assert not marker.exists()

    # the payload is live: an unsafe load would have run it (so the assertions above can fail)
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("cut", [0, 100, 0.5, -1])
def test_truncated_checkpoint(tiny_checkpoint, tmp_path, cut):
    data = tiny_checkpoint.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:end])
    with pytest.raises(LoadError, match="cannot read checkpoint .*: truncated, corrupt or not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_flipped_bytes_inside_a_tensor_fail_the_crc(tiny_checkpoint, tmp_path):
    # torch.load itself would load these silently as wrong weights
    data = bytearray(tiny_checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"fails its CRC check \(the file was damaged or edited\)"):
        load_checkpoint(path)


def _drop_first_weight(c):
    # the first weight of the network (metric states such as val_acc_best may come first in the dict)
    c["state_dict"].pop(next(k for k in c["state_dict"] if k.startswith("backbone.")))


def _misshape_head(c):
    c["state_dict"]["head.1.weight"] = torch.zeros(3, c["state_dict"]["head.1.weight"].shape[1])


def _nan_weight(c):
    c["state_dict"]["head.1.bias"] = torch.full_like(c["state_dict"]["head.1.bias"], float("nan"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("hyper_parameters"), "is not a Lightning checkpoint of a hymtl model"),
        (lambda c: c["hyper_parameters"].update(class_names=["ants", "bees", "wasps"]), "are not 2 distinct names"),
        (lambda c: c["hyper_parameters"].update(class_names=["ants", "ants"]), "are not 2 distinct names"),
        (lambda c: c["hyper_parameters"].update(num_classes=1), "invalid num_classes: 1"),
        (lambda c: c["hyper_parameters"].update(backbone="resnet19"), "unknown backbone 'resnet19'"),
        (lambda c: c["hyper_parameters"].update(lr="fast"), "invalid hyperparameters"),
        (_drop_first_weight, "weights do not fit its efficientnet_lite0 model"),
        (_misshape_head, "weights do not fit its efficientnet_lite0 model"),
        (lambda c: c["state_dict"].update(extra=torch.zeros(1)), "weights do not fit"),
        (lambda c: c["state_dict"].update({"head.1.bias": "text"}), "state_dict holds values that are not tensors"),
        (_nan_weight, r"non-finite weights in 1 tensors \(e.g. head.1.bias\)"),
    ],
)
def test_tampered_checkpoint_contents(tiny_checkpoint, tmp_path, change, message):
    path = _save_variant(tiny_checkpoint, tmp_path / "tampered.ckpt", change)
    with pytest.raises(LoadError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04" + bytes(100)])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(LoadError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_a_torch_file_that_is_not_a_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(LoadError, match="is not a Lightning checkpoint of a hymtl model"):
        load_checkpoint(tmp_path / "tensor.ckpt")


def test_the_good_checkpoint_loads(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    assert model.class_names == ["ants", "bees"] and not model.training
    assert model.preprocessing.input_size == 224


# --------------------------------------------------------------------------- exports + sidecars
@pytest.fixture(scope="module")
def tiny_exports(tiny_checkpoint, tmp_path_factory) -> Path:
    """``m.onnx`` (legacy exporter, opset 17) and ``m.pt`` with sidecars, parity-checked on tiny images."""
    from hymtl.export import export

    out = tmp_path_factory.mktemp("tiny_exports")
    images = tiny_checkpoint.parent / "images" / "val"
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        sidecar = export(compose_app(
            "export", f"ckpt_path={tiny_checkpoint}", f"format={fmt}", f"out={out / name}",
            f"parity.inputs=[{images}]", "parity.num_workers=0", "onnx.exporter=torchscript", "onnx.opset=17",
        ))
        assert sidecar["parity"]["images"] == 12 and sidecar["parity"]["top1_agree"] == 12
    return out


@pytest.fixture
def exports(tiny_exports, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(tiny_exports, tmp_path / "exports"))


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _reseal(model: Path) -> None:
    """What an attacker who also rewrites the sidecar would do: the checksum matches again."""
    _edit_json(sidecar_path(model), lambda m: m.update(sha256=sha256_bytes(model.read_bytes())))


def test_good_exports_load_with_and_without_sidecar(exports):
    session, meta = load_onnx(exports / "m.onnx")
    assert meta["class_names"] == ["ants", "bees"] and meta["opset"] == 17
    assert session.get_inputs()[0].shape[0] == "batch"
    sidecar_path(exports / "m.onnx").unlink()
    _, embedded = load_onnx(exports / "m.onnx")  # metadata from inside the ONNX file
    assert embedded["class_names"] == ["ants", "bees"] and embedded["preprocessing"] == meta["preprocessing"]
    module, meta = load_torchscript(exports / "m.pt", trust=True)
    assert meta["model_format"] == "torchscript"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="other"), "not a hymtl export description"),
        (lambda m: m.update(version=3), "unsupported version 3"),
        (lambda m: m.update(version=2), "a multiclass model's description has version 1, got 2"),
        (lambda m: m.update(class_names=["ants", "ants"]), "class_names must be a list of distinct"),
        (lambda m: m.update(class_names="ants,bees"), "class_names must be a list of distinct"),
        (lambda m: m.update(num_classes=3), "num_classes 3 does not match the 2 class_names"),
        (lambda m: m["preprocessing"].update(mean=[0.5, 0.5]), "preprocessing.mean must be three finite numbers"),
        (lambda m: m["preprocessing"].update(std=[0.5, 0.0, 0.5]), "preprocessing.std must be positive"),
        (lambda m: m["preprocessing"].update(input_size="224"), "preprocessing.input_size must be an integer"),
        (lambda m: m["preprocessing"].update(resize_size=100), "resize_size is smaller than the crop"),
        (lambda m: m["preprocessing"].update(interpolation="lanczos9"), "interpolation must be one of"),
        (lambda m: m.pop("preprocessing"), "no preprocessing"),
        (lambda m: m.pop("sha256"), "has no sha256 of its model file"),
        (lambda m: m.update(sha256="0" * 64), r"does not match its sidecar m\.onnx\.json \(SHA-256 differs\)"),
    ],
)
def test_tampered_sidecar(exports, change, message):
    _edit_json(sidecar_path(exports / "m.onnx"), change)
    with pytest.raises(LoadError, match=message):
        load_onnx(exports / "m.onnx")


def test_sidecar_class_count_must_fit_the_model_output(exports):
    def three_classes(m):
        m.update(class_names=["ants", "bees", "wasps"], num_classes=3)

    _edit_json(sidecar_path(exports / "m.onnx"), three_classes)
    with pytest.raises(LoadError, match=r"contradicts the model file .* on class_names, num_classes"):
        load_onnx(exports / "m.onnx")


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"\xff\xfe\x00", b"[1, 2]"])
def test_truncated_or_garbage_sidecar(exports, content):
    side = sidecar_path(exports / "m.onnx")
    side.write_bytes(side.read_bytes()[: len(side.read_bytes()) // 2] if content is None else content)
    with pytest.raises(LoadError, match=r"sidecar .*m\.onnx\.json"):
        read_sidecar(side)
    with pytest.raises(LoadError, match=r"sidecar .*m\.onnx\.json"):
        load_onnx(exports / "m.onnx")


@pytest.mark.parametrize("cut", [0, 50, 0.3, 0.9, -1])
@pytest.mark.parametrize("resealed", [False, True])
def test_truncated_onnx(exports, cut, resealed):
    model = exports / "m.onnx"
    data = model.read_bytes()
    model.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut % len(data)])
    if resealed:  # the sidecar agrees: ONNX parsing, the checker or ONNX Runtime must catch it
        _reseal(model)
        match = r"(cannot read ONNX model|ONNX Runtime cannot load|ONNX model) .*m\.onnx"
    else:
        match = r"does not match its sidecar m\.onnx\.json \(SHA-256 differs\)"
    with pytest.raises(LoadError, match=match):
        load_onnx(model)


@pytest.mark.parametrize("resealed", [False, True])
def test_tampered_onnx(exports, resealed):
    import onnx

    model = exports / "m.onnx"
    proto = onnx.load(str(model))
    proto.graph.node[0].input[0] = "no_such_tensor"  # a structural edit
    model.write_bytes(proto.SerializeToString())
    if resealed:
        _reseal(model)
    with pytest.raises(LoadError, match="SHA-256 differs" if not resealed else "cannot read ONNX model .*invalid"):
        load_onnx(model)


def test_onnx_without_sidecar_needs_valid_embedded_metadata(exports):
    import onnx

    model = exports / "m.onnx"
    sidecar_path(model).unlink()
    proto = onnx.load(str(model))
    proto.metadata_props[0].value = proto.metadata_props[0].value[:40]
    model.write_bytes(proto.SerializeToString())
    with pytest.raises(LoadError, match="its hymtl metadata is not valid JSON"):
        load_onnx(model)
    meta = json.loads((exports / "m.pt.json").read_text())
    meta["preprocessing"]["input_size"] = 240
    proto.metadata_props[0].value = json.dumps(meta)
    model.write_bytes(proto.SerializeToString())
    with pytest.raises(LoadError, match=r"input .* is not \(batch, 3, 240, 240\)"):
        load_onnx(model)
    del proto.metadata_props[:]
    model.write_bytes(proto.SerializeToString())
    with pytest.raises(LoadError, match="has neither a sidecar .* nor hymtl metadata"):
        load_onnx(model)
    model.write_bytes(os.urandom(4096))
    with pytest.raises(LoadError, match="cannot read ONNX model"):
        load_onnx(model)


@pytest.mark.parametrize("resealed", [False, True])
def test_truncated_torchscript(exports, resealed):
    model = exports / "m.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    if resealed:
        _reseal(model)
    with pytest.raises(LoadError, match="truncated or corrupt" if resealed else "SHA-256 differs"):
        load_torchscript(model, trust=True)


def test_trusted_torchscript_describes_itself_without_a_sidecar(exports):
    with_sidecar = load_torchscript(exports / "m.pt", trust=True)[1]
    sidecar_path(exports / "m.pt").unlink()
    _, meta = load_torchscript(exports / "m.pt", trust=True)  # the archive's own extra/hymtl.json
    assert meta["class_names"] == ["ants", "bees"] and meta["preprocessing"] == with_sidecar["preprocessing"]


def test_missing_files(tmp_path):
    for loader, what in ((load_checkpoint, "checkpoint"), (load_onnx, "ONNX model"),
                         (load_torchscript, "TorchScript model"), (read_sidecar, "sidecar")):
        with pytest.raises(LoadError, match=f"{what} not found: "):
            loader(tmp_path / "nothing")


# --------------------------------------------------------------------------- code from a model file
class HostileProgram(torch.nn.Module):
    """What a hostile sender can script: ``forward`` creates ``created``, overwrites ``victim``
    (``torch.from_file(shared=True)`` maps a file read-write) and reads ``secret`` into the logits."""

    def __init__(self, created: str, victim: str, secret: str):
        super().__init__()
        self.created, self.victim, self.secret = created, victim, secret

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        made = torch.from_file(self.created, True, 8, dtype=torch.uint8)
        made.fill_(88)
        smashed = torch.from_file(self.victim, True, 8, dtype=torch.uint8)
        smashed.fill_(66)
        stolen = torch.from_file(self.secret, False, 2, dtype=torch.uint8).float()
        return images.mean(dim=(2, 3))[:, :2] * 0 + stolen + made[:2].float() * 0 + smashed[:2].float() * 0


def _hostile_torchscript(tiny_checkpoint: Path, folder: Path) -> tuple[Path, Path, Path]:
    """``evil.pt`` with everything a real export has: hymtl metadata inside and a sidecar whose
    SHA-256 matches (whoever sends the model sends the sidecar). Returns (model, created, victim)."""
    from hymtl.loading import TORCHSCRIPT_METADATA_FILE, export_metadata, write_sidecar

    created, victim, secret = folder / "created_by_model", folder / "victim.txt", folder / "secret.txt"
    victim.write_text("original")
    secret.write_bytes(b"\x07\x09")
    model = load_checkpoint(tiny_checkpoint)
    meta = export_metadata(model.class_names, model.preprocessing, "torchscript")
    scripted = torch.jit.script(HostileProgram(str(created), str(victim), str(secret)))
    evil = folder / "evil.pt"
    torch.jit.save(scripted, str(evil), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
    write_sidecar(evil, meta)
    return evil, created, victim


@pytest.mark.slow
def test_hostile_torchscript_is_refused_by_default_and_nothing_runs(tiny_checkpoint, tmp_path):
    from hymtl.inference import collect_inputs, load_predictor, predict

    evil, created, victim = _hostile_torchscript(tiny_checkpoint, tmp_path)
    images = tiny_checkpoint.parent / "images" / "val"
    refusal = r"refusing to load TorchScript model .*evil\.pt: TorchScript is a program .* trust_model=true"
    with pytest.raises(LoadError, match=refusal):
        load_torchscript(evil)
    with pytest.raises(LoadError, match=refusal):
        load_predictor(evil)
    disguised = Path(shutil.copy(evil, tmp_path / "evil.ckpt"))  # the name does not decide: the content does
    with pytest.raises(LoadError, match=r"refusing to load TorchScript model .*evil\.ckpt"):
        load_predictor(disguised)
    with pytest.raises(LoadError, match=r"refusing to read .*evil\.ckpt as a checkpoint: it is a TorchScript program"):
        load_checkpoint(disguised)  # eval, export and resume read checkpoints through this
    from hymtl.evaluation import EvalError, load_checkpoint as eval_load_checkpoint

    with pytest.raises(EvalError, match=r"evil\.ckpt as a checkpoint: it is a TorchScript program"):
        eval_load_checkpoint(disguised)

    result = subprocess.run([*entry_command("hymtl.predict"), f"ckpt_path={evil}", f"inputs=[{images}]"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: refusing to load TorchScript model {evil}: ") and "trust_model=true" in line
    assert not created.exists() and victim.read_text() == "original" and result.stdout == ""

    # the payload is live: trusting the file runs it (so the assertions above can fail)
    predictor = load_predictor(evil, trust_model=True)
    paths, _ = collect_inputs([str(images / "ants")])
    out = predict(predictor, paths[:1], num_workers=0)
    assert created.exists() and victim.read_bytes() == b"B" * 8
    assert out.logits.tolist() == [[7.0, 9.0]]  # the secret file's bytes, read by the model


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.update(class_names=["bees", "ants"]), "class_names"),  # labels swapped: every answer wrong
        (lambda m: m["preprocessing"].update(mean=[0.1, 0.2, 0.3]), "preprocessing"),
        (lambda m: m["preprocessing"].update(input_size=192), "preprocessing"),
    ],
)
@pytest.mark.parametrize("model", ["m.onnx", "m.pt"])
def test_a_sidecar_never_overrides_the_model_file(exports, change, field, model):
    # the model file is untouched, so the sidecar's SHA-256 still matches: it proves nothing
    _edit_json(sidecar_path(exports / model), change)
    with pytest.raises(LoadError, match=rf"sidecar {model}\.json contradicts the model file .*{model} on {field} "
                                        r"\(sidecar .*, model .*\): a sidecar cannot change what a model means"):
        load_onnx(exports / model) if model.endswith(".onnx") else load_torchscript(exports / model, trust=True)

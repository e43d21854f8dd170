"""hymtl.export: an ants/bees run to ONNX and TorchScript, parity on every val image, predict from both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, entry_command
from hymtl.loading import load_onnx, sidecar_path
from hymtl.model import load_checkpoint
from hymtl.errors import HymtlError
from test_predict import compose_app

VAL_IMAGES = 153  # hymenoptera_data/val: 70 ants + 83 bees


def run_export(*overrides: str, cwd: Path = REPO_ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command("hymtl.export"), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def onnx_export(real_checkpoint, tmp_path_factory):
    """The CLI with its defaults: dynamo exporter, opset 18, parity on the run's val split."""
    out = tmp_path_factory.mktemp("onnx_export") / "model.onnx"
    result = run_export(f"ckpt_path={real_checkpoint}", "format=onnx", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


@pytest.mark.slow
def test_onnx_export_parity_on_all_val_images(onnx_export, real_data):
    result, out = onnx_export
    line = next(l for l in result.stdout.splitlines() if l.startswith("parity "))
    assert f"on {VAL_IMAGES} images" in line and f"top-1 agree {VAL_IMAGES}/{VAL_IMAGES}" in line
    assert line.endswith(": OK") and "batch sizes [25, 32]" in line  # a full and a partial batch: dynamic axis
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["parity"]["images"] == meta["parity"]["top1_agree"] == VAL_IMAGES
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4 and meta["parity"]["inputs"] == [str(real_data / "val")]
    assert meta["opset"] == 18 and meta["exporter"] == "dynamo"
    assert meta["class_names"] == ["ants", "bees"]
    assert meta["preprocessing"] == {"input_size": 224, "resize_size": 256, "mean": [0.5] * 3, "std": [0.5] * 3,
                                     "interpolation": "bicubic", "crop": "center"}

    # runs with onnxruntime alone, any batch size, and reproduces the checkpoint on a fresh batch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape[1:]] == [3, 224, 224]
    model = load_checkpoint(next(a for a in result.args if a.startswith("ckpt_path=")).split("=", 1)[1])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (batch, 2) and np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_torchscript_export_parity_on_all_val_images(real_checkpoint, tmp_path, capsys):
    from hymtl.export import export

    out = tmp_path / "model.pt"
    meta = export(compose_app("export", f"ckpt_path={real_checkpoint}", "format=torchscript", f"out={out}"))
    line = capsys.readouterr().out
    assert f"parity torchscript vs checkpoint (fp32) on {VAL_IMAGES} images" in line
    assert meta["parity"]["top1_agree"] == VAL_IMAGES and meta["parity"]["max_abs_logit_diff"] <= 1e-4
    scripted = torch.jit.load(str(out))  # plain torch, no hymtl
    assert scripted(torch.zeros(5, 3, 224, 224)).shape == (5, 2)


@pytest.mark.slow
def test_predict_from_onnx_and_from_checkpoint_agree(onnx_export, real_checkpoint, real_data):
    from hymtl.inference import collect_inputs, format_result, load_predictor, predict

    _, onnx_file = onnx_export
    paths, _ = collect_inputs([str(real_data / "val")])
    assert len(paths) == VAL_IMAGES
    paths = paths[::3]  # both classes; every image is already compared by the export's parity check
    by_onnx = predict(load_predictor(onnx_file), paths, topk=2, num_workers=0)
    by_ckpt = predict(load_predictor(real_checkpoint), paths, topk=2, num_workers=0)
    assert (by_onnx.backend, by_ckpt.backend) == ("onnxruntime", "pytorch")
    assert [p.path for p in by_onnx.predictions] == [p.path for p in by_ckpt.predictions] == paths
    assert [p.top[0][0] for p in by_onnx.predictions] == [p.top[0][0] for p in by_ckpt.predictions]
    assert np.abs(by_onnx.logits - by_ckpt.logits).max() <= 1e-4
    onnx_doc, ckpt_doc = (json.loads(format_result(r, "json")) for r in (by_onnx, by_ckpt))
    assert onnx_doc.keys() == ckpt_doc.keys() and onnx_doc["class_names"] == ckpt_doc["class_names"]
    assert format_result(by_onnx, "csv").splitlines()[0] == format_result(by_ckpt, "csv").splitlines()[0]
    accuracy = np.mean([Path(p.path).parent.name == p.top[0][0] for p in by_ckpt.predictions])
    assert accuracy > 0.6 and len(paths) == 51  # a briefly trained model that works: top-1 agreement is about real decisions


@pytest.mark.slow
def test_broken_parity_fails_loudly_and_writes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "never.onnx"
    images = tiny_checkpoint.parent / "images" / "val"
    result = run_export(f"ckpt_path={tiny_checkpoint}", f"out={out}", f"parity.inputs=[{images}]",
                        "parity.atol=1e-12", "parity.num_workers=0", "onnx.exporter=torchscript", "onnx.opset=17")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: parity check failed, nothing written to {out}")
    assert "FAILED" in result.stdout
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.slow
def test_parity_check_catches_a_different_model(onnx_export, real_checkpoint, real_data):
    from hymtl.exporting import check_parity
    from hymtl.inference import OnnxPredictor, TorchPredictor, collect_inputs

    _, onnx_file = onnx_export
    model = load_checkpoint(real_checkpoint)
    with torch.no_grad():
        model.head[-1].bias.add_(torch.tensor([0.05, -0.05]))  # a small, real difference
    paths = collect_inputs([str(real_data / "val" / "ants")])[0][:8]
    report = check_parity(TorchPredictor(model), OnnxPredictor(*load_onnx(onnx_file)), paths, num_workers=0)
    assert not report.ok and report.max_abs_logit_diff == pytest.approx(0.05, abs=1e-3)
    assert report.line().endswith(": FAILED")


@pytest.mark.slow
def test_dynamo_exporter_will_not_silently_change_the_opset(tiny_checkpoint):
    from hymtl.loading import export_metadata
    from hymtl.exporting import ExportError, onnx_bytes

    model = load_checkpoint(tiny_checkpoint)
    meta = export_metadata(model.class_names, model.preprocessing, "onnx")
    with pytest.raises(ExportError, match=r"wrote opset 18 instead of the requested 17 \(use onnx.exporter=torchscript"):
        onnx_bytes(model, meta, opset=17, exporter="dynamo")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["format=onnx"], "ckpt_path= is required"),
        (["ckpt_path=CKPT", "format=tflite"], "format must be one of onnx, torchscript"),
        (["ckpt_path=CKPT"], "parity needs real images and the run's data folder was not found"),
        (["ckpt_path=CKPT", "parity.inputs=[/nowhere]"], "no parity images in ['/nowhere']"),
        (["ckpt_path=CKPT", "out=CKPT"], "out=CKPT would overwrite the checkpoint"),
        (["ckpt_path=CKPT", "parity.atol=abc"], "parity.atol must be a number, got 'abc'"),
        (["ckpt_path=CKPT", "parity.atol=-1"], "parity.atol must not be negative, got -1"),
        (["ckpt_path=CKPT", "parity.max_images=0"], "parity.max_images must be a positive integer, got 0"),
        (["ckpt_path=CKPT", "parity.batch_size=2.5"], "parity.batch_size must be an integer, got 2.5"),
        (["ckpt_path=CKPT", "parity.num_workers=-2"], "parity.num_workers must be 'auto' or an integer >= 0"),
    ],
)
def test_bad_export_input(tiny_checkpoint, overrides, message):
    from hymtl.export import export

    with pytest.raises(HymtlError) as info:
        export(compose_app("export", *(o.replace("CKPT", str(tiny_checkpoint)) for o in overrides)))
    assert str(info.value).startswith(message.replace("CKPT", str(tiny_checkpoint)))


def test_default_parity_images_come_from_the_training_run(tiny_folder, tmp_path):
    from hymtl.data.sources import trained_validation_inputs

    run = tmp_path / "outputs" / "day" / "time"
    (run / ".hydra").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert trained_validation_inputs(ckpt) == []  # no config: the export asks for parity.inputs
    # a relative data.root is relative to where the training was launched
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  root: {tiny_folder.name}\n")
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {tiny_folder.parent}\n")
    assert trained_validation_inputs(ckpt) == [str(tiny_folder / "val")]
    (run / ".hydra" / "config.yaml").write_text("data:\n  root: ${paths.nowhere}/x\n")  # unresolvable
    assert trained_validation_inputs(ckpt) == []


@pytest.mark.slow
def test_every_export_phase_says_when_it_starts_and_how_long_it_took(tiny_checkpoint, tmp_path):
    """Not a terminal (as in CI or a log): no bar, one line per phase with its duration."""
    import re

    out = tmp_path / "m.onnx"
    images = tiny_checkpoint.parent / "images" / "val"
    result = run_export(f"ckpt_path={tiny_checkpoint}", f"out={out}", f"parity.inputs=[{images}]",
                        "parity.num_workers=0", "onnx.exporter=torchscript", "onnx.opset=17")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    phases = [f"reading checkpoint {tiny_checkpoint}", "exporting to ONNX (torchscript exporter, opset 17",
              "loading the export back (hymtl.loading)", f"writing {out}"]
    for name in phases:
        started = [i for i, l in enumerate(lines) if l.startswith(name) and l.endswith(" ...")]
        ended = [i for i, l in enumerate(lines) if l.startswith(name) and re.search(r": done in \d+\.\ds$", l)]
        assert len(started) == len(ended) == 1 and started[0] < ended[0], (name, lines)
    parity = [l for l in lines if l.startswith("checking parity (onnxruntime vs checkpoint): ")]
    assert len(parity) == 1 and re.fullmatch(
        r"checking parity \(onnxruntime vs checkpoint\): 12 images in \d+\.\ds \([\d.]+ images/s, skipped 0\)",
        parity[0])
    assert "\r" not in result.stdout and not re.search(r"it/s|s/it", result.stdout + result.stderr)  # no progress bar
    assert lines[-1].startswith(f"wrote {out}")

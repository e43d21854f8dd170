"""hymtl.predict: input collection, batched prediction, the three output formats, skipped images."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import entry_command, make_image
from hymtl.inference import collect_inputs, format_result, load_predictor, predict


def run_predict(*overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command("hymtl.predict"), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_collect_inputs_files_folders_globs_and_misses(tmp_path):
    make_image(tmp_path / "a" / "one.jpg", (10, 20, 30))
    make_image(tmp_path / "a" / "deep" / "two.PNG", (10, 20, 30), fmt="PNG")
    make_image(tmp_path / "a" / ".hidden" / "three.jpg", (10, 20, 30))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    make_image(tmp_path / "b" / "four.jpg", (10, 20, 30))
    make_image(tmp_path / "b" / "five.bmp", (10, 20, 30), fmt="BMP")
    (tmp_path / "b" / "six.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    explicit = make_image(tmp_path / "c.data", (10, 20, 30), fmt="PNG")  # explicit: taken whatever its extension
    (tmp_path / "b" / "seven.jpg").write_text("a text file named .jpg")  # training's file check drops it

    files, skipped = collect_inputs([
        str(tmp_path / "a"), str(tmp_path / "b" / "*"), str(explicit), str(tmp_path / "a" / "one.jpg"),
        str(tmp_path / "missing.jpg"), str(tmp_path / "nope" / "*.jpg"), str(tmp_path / "empty"),
    ])
    names = [Path(f).name for f in files]
    assert names == ["one.jpg", "two.PNG", "five.bmp", "four.jpg", "c.data"]  # a/ walked, then the glob; deduped
    assert {Path(s.path).name: s.reason for s in skipped} == {
        "missing.jpg": "no such file or folder", "*.jpg": "pattern matches no images", "empty": "folder holds no images",
        "seven.jpg": "not an image: format not recognised",
    }


def test_predict_skips_bad_images_and_formats_agree(tiny_checkpoint, tmp_path):
    images = tiny_checkpoint.parent / "images" / "val"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((images / "ants" / "ants_0.jpg").read_bytes()[:200])  # truncated JPEG
    (tmp_path / "text.png").write_text("not a png")
    predictor = load_predictor(tiny_checkpoint)
    files, skipped = collect_inputs([str(images), str(broken), str(tmp_path / "text.png")])
    result = predict(predictor, files, topk=5, batch_size=5, num_workers=0, skipped=skipped)

    assert len(result.predictions) == 12 and result.logits.shape == (12, 2)
    assert sorted(Path(s.path).name for s in result.skipped) == ["broken.jpg", "text.png"]
    for p in result.predictions:
        assert len(p.top) == 2  # topk is capped at the number of classes
        assert {label for label, _ in p.top} == {"ants", "bees"}
        assert p.top[0][1] >= p.top[1][1] and abs(sum(pr for _, pr in p.top) - 1) < 1e-6

    table = format_result(result, "table").splitlines()
    assert table[0].split() == ["path", "label", "probability", "label_2", "probability_2"] and len(table) == 13
    rows = list(csv.DictReader(io.StringIO(format_result(result, "csv"))))
    doc = json.loads(format_result(result, "json"))
    assert [r["path"] for r in rows] == [p["path"] for p in doc["predictions"]] == [p.path for p in result.predictions]
    assert [r["label"] for r in rows] == [p["label"] for p in doc["predictions"]]
    assert np.allclose([float(r["probability"]) for r in rows], [p["probability"] for p in doc["predictions"]], atol=1e-6)
    assert doc["class_names"] == ["ants", "bees"] and doc["backend"] == "pytorch"
    assert sorted(Path(s["path"]).name for s in doc["skipped"]) == ["broken.jpg", "text.png"]


@pytest.mark.slow
def test_cli_prints_table_and_skipped_lines(tiny_checkpoint, tmp_path):
    images = tiny_checkpoint.parent / "images"
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    result = run_predict(f"ckpt_path={tiny_checkpoint}", f"inputs=[{images}/val/ants,'{images}/val/bees/*.jpg',bad.jpg]",
                         "num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 13 and lines[0].split() == ["path", "label", "probability"]
    assert "skipped bad.jpg: " in result.stderr and "12 images in " in result.stderr and "images/s" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg"]  # no run folder, no log file


def test_run_writes_csv_out_file_and_json_on_stdout(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from hymtl.predict import run

    monkeypatch.chdir(tmp_path)
    images = tiny_checkpoint.parent / "images" / "val"
    run(compose_predict(f"ckpt_path={tiny_checkpoint}", f"inputs=[{images}]", "format=csv", "out=preds/p.csv",
                        "topk=2", "num_workers=0"))
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader((tmp_path / "preds" / "p.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == ["path", "label", "probability", "label_2", "probability_2"]
    run(compose_predict(f"ckpt_path={tiny_checkpoint}", f"inputs=[{images}]", "format=json", "num_workers=0"))
    doc = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in doc["predictions"]] == [r["path"] for r in rows]
    assert [p["label"] for p in doc["predictions"]] == [r["label"] for r in rows]


def compose_app(config_name: str, *overrides: str):
    """An entry point's config (conf/<config_name>.yaml) through Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hymtl.runtime import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def compose_predict(*overrides: str):
    return compose_app("predict", *overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inputs=[x.jpg]"], "ckpt_path= is required"),
        (["ckpt_path=CKPT"], "inputs= is required"),
        (["ckpt_path=CKPT", "inputs=[nothing_here]"], "no images to predict (nothing_here: no such file"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]"], "no images to predict (bad.jpg: not an image: format not recognised)"),
        (["ckpt_path=CKPT", "inputs=[cut.jpg]"], "none of the 1 images could be read"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "format=xml"], "format must be one of table, csv, json"),
        (["ckpt_path=missing.ckpt", "inputs=[bad.jpg]"], "checkpoint not found: missing.ckpt"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "batch_size=0"], "batch_size must be a positive integer"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "batch_size=abc"], "batch_size must be an integer, got 'abc'"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "topk=abc"], "topk must be an integer, got 'abc'"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "topk=0"], "topk must be a positive integer, got 0"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "num_workers=-1"], "num_workers must be 'auto' or an integer >= 0, got -1"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "trust_model=maybe"], "trust_model must be true or false, got maybe"),
        # checked before anything is predicted (the missing checkpoint would be found later)
        (["ckpt_path=missing.ckpt", "inputs=[bad.jpg]", "out=sub"], "out=sub is a folder: give the name of the file"),
    ],
)
def test_bad_input_raises_one_clear_error(tiny_checkpoint, tmp_path, monkeypatch, overrides, message):
    from hymtl.errors import HymtlError
    from hymtl.predict import run

    monkeypatch.chdir(tmp_path)  # relative inputs, as on a command line
    (tmp_path / "bad.jpg").write_text("not an image")
    (tmp_path / "sub").mkdir()
    whole = make_image(tmp_path / "whole.jpg", (10, 20, 30), size=(300, 300)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 3])  # the header is fine, the pixels are not
    cfg = compose_predict("num_workers=0", *(o.replace("CKPT", str(tiny_checkpoint)) for o in overrides))
    with pytest.raises(HymtlError) as info:
        run(cfg)
    assert str(info.value).startswith(message)


@pytest.mark.slow
def test_cli_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    result = run_predict("ckpt_path=missing.ckpt", "inputs=[bad.jpg]", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: checkpoint not found: missing.ckpt"]


@pytest.mark.slow
def test_cli_topk_abc_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    images = tiny_checkpoint.parent / "images" / "val"
    result = run_predict(f"ckpt_path={tiny_checkpoint}", f"inputs=[{images}]", "topk=abc", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: topk must be an integer, got 'abc'"]


@pytest.mark.slow
def test_special_files_in_folders_globs_and_by_name_are_skipped_not_waited_on(tiny_checkpoint, tmp_path):
    """A FIFO blocks whoever opens it: the file check (training's) skips it before decoding."""
    good = tiny_checkpoint.parent / "images" / "val" / "ants" / "ants_0.jpg"
    for sub in ("folder", "globbed", "named"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "good.jpg").write_bytes(good.read_bytes())
        os.mkfifo(tmp_path / sub / "pipe.jpg")
    try:
        result = run_predict(f"ckpt_path={tiny_checkpoint}",
                             "inputs=[folder,'globbed/*.jpg',named/good.jpg,named/pipe.jpg]",
                             "num_workers=0", "format=csv", cwd=tmp_path, timeout=600)  # a hang never ends
    except subprocess.TimeoutExpired:
        pytest.fail("hymtl.predict hung on a FIFO")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["path"] for r in csv.DictReader(io.StringIO(result.stdout))] == [
        "folder/good.jpg", "globbed/good.jpg", "named/good.jpg"]
    for sub in ("folder", "globbed", "named"):
        assert f"skipped {sub}/pipe.jpg: not a regular file" in result.stderr.splitlines()


def test_predict_refuses_decompression_bombs_as_training_does(tiny_checkpoint, tmp_path, monkeypatch):
    from PIL import Image

    from hymtl.data.images import check_image_file

    # between 1x and 2x Pillow's limit Pillow only warns and decodes; training's file check refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)
    bomb = make_image(tmp_path / "bomb.png", (10, 20, 30), size=(100, 100), fmt="PNG")  # 10,000 pixels
    fine = make_image(tmp_path / "fine.png", (10, 20, 30), fmt="PNG")  # 48x40
    files, skipped = collect_inputs([str(tmp_path)])
    result = predict(load_predictor(tiny_checkpoint), files, num_workers=0, skipped=skipped)
    assert [p.path for p in result.predictions] == [str(fine)]
    assert [(s.path, s.reason) for s in result.skipped] == [(str(bomb), check_image_file(bomb))]
    assert result.skipped[0].reason.startswith("decompression bomb refused: 100x100 = 10,000 pixels")


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_stays_strict_json_when_the_model_gives_nan(tiny_checkpoint):
    import torch

    from hymtl.inference import TorchPredictor
    from hymtl.model import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))  # a broken model: its logits are not numbers
    files, _ = collect_inputs([str(tiny_checkpoint.parent / "images" / "val" / "ants")])
    result = predict(TorchPredictor(model), files[:3], topk=2, num_workers=0)
    doc = _strict_json(format_result(result, "json"))
    assert [p["probability"] for p in doc["predictions"]] == [None] * 3
    assert all(t["probability"] is None for p in doc["predictions"] for t in p["top"])


WEIRD_NAMES = ["new\nline.jpg", "tab\there.jpg", "esc\x1b[31mred.jpg", os.fsdecode(b"latin\xe9.jpg")]


@pytest.mark.slow
def test_any_file_name_works_and_cannot_forge_lines(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from hymtl.predict import run

    folder = tmp_path / "in"
    for i, name in enumerate(WEIRD_NAMES):
        make_image(folder / name, (200, 40, 40), seed=i)
    (folder / "x\nerror: forged line.jpg").write_text("not an image")
    monkeypatch.chdir(tmp_path)

    run(compose_predict(f"ckpt_path={tiny_checkpoint}", "inputs=[in]", "num_workers=0"))
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert all(line.isprintable() for line in stream.splitlines())  # no tab, ESC or stray byte reaches the terminal
    table = captured.out.splitlines()
    assert len(table) == 1 + len(WEIRD_NAMES)
    assert "in/new\\nline.jpg" in captured.out and "in/esc\\x1b[31mred.jpg" in captured.out
    assert "in/latin\\xe9.jpg" in captured.out
    assert [l for l in captured.err.splitlines() if "forged" in l] == [
        "skipped in/x\\nerror: forged line.jpg: not an image: format not recognised"]

    # machine-readable outputs keep the real name; bytes that are not UTF-8 as \xNN (valid UTF-8)
    expected = sorted([f"in/{n}" for n in WEIRD_NAMES[:3]] + ["in/latin\\xe9.jpg"])
    run(compose_predict(f"ckpt_path={tiny_checkpoint}", "inputs=[in]", "num_workers=0", "format=csv", "out=p.csv"))
    with open(tmp_path / "p.csv", encoding="utf-8", newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == expected
    run(compose_predict(f"ckpt_path={tiny_checkpoint}", "inputs=[in]", "num_workers=0", "format=json", "out=p.json"))
    doc = _strict_json((tmp_path / "p.json").read_bytes().decode("utf-8"))
    assert sorted(p["path"] for p in doc["predictions"]) == expected
    assert [s["path"] for s in doc["skipped"]] == ["in/x\nerror: forged line.jpg"]


# --------------------------------------------------------------------------- precision, channels-last
def _val_batch(tiny_checkpoint, model, n: int = 6):
    from hymtl.inference import iter_batches

    files, _ = collect_inputs([str(tiny_checkpoint.parent / "images" / "val")])
    return next(iter_batches(files[:n], model.preprocessing, batch_size=n, num_workers=0))[1]


def test_fp32_path_is_the_modules_own_forward_exactly_as_trained_and_to_rounding_simplified(tiny_checkpoint):
    import torch

    from hymtl.inference import Simplified, TorchPredictor
    from hymtl.model import load_checkpoint

    reference = load_checkpoint(tiny_checkpoint)
    reference.setup("predict")  # as Lightning runs it: the module's own channels-last rule
    images = _val_batch(tiny_checkpoint, reference)
    with torch.inference_mode():
        expected = reference(images).numpy()
    exact = TorchPredictor(load_checkpoint(tiny_checkpoint), simplify=False)
    assert exact.precision == "32" and exact.simplified == Simplified()
    assert np.array_equal(exact.logits(images), expected)
    assert np.array_equal(exact.logits(images.clone()), expected)  # contiguous input too
    predictor = TorchPredictor(load_checkpoint(tiny_checkpoint))  # the default: fp32, simplified
    assert predictor.precision == "32" and predictor.simplified == Simplified(49, 5)  # lite0: 49 norms, 5 stride-2
    assert np.abs(predictor.logits(images) - expected).max() <= 1e-4 * (1 + np.abs(expected).max())


def test_bf16_and_fp32_agree_on_labels_and_probabilities(tiny_checkpoint):
    from hymtl.inference import TorchPredictor, softmax
    from hymtl.model import load_checkpoint

    fp32 = TorchPredictor(load_checkpoint(tiny_checkpoint), precision="32")
    bf16 = TorchPredictor(load_checkpoint(tiny_checkpoint), precision="bf16")
    assert bf16.precision == "bf16"
    images = _val_batch(tiny_checkpoint, fp32.model, n=12)
    a, b = fp32.logits(images), bf16.logits(images)
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 really ran
    pa, pb = softmax(a), softmax(b)
    assert np.abs(pa - pb).max() < 0.05
    sure = np.abs(pa[:, 0] - pa[:, 1]) > 0.1  # labels of near-ties may flip
    assert (pa.argmax(1) == pb.argmax(1))[sure].all()


def test_predictor_feeds_the_model_channels_last(tiny_checkpoint):
    import torch

    from hymtl.inference import TorchPredictor
    from hymtl.model import load_checkpoint

    predictor = TorchPredictor(load_checkpoint(tiny_checkpoint))
    seen = []
    first_conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    predictor.logits(_val_batch(tiny_checkpoint, predictor.model))
    assert seen == [True]


def test_auto_precision_follows_torchs_native_bf16_query(tiny_checkpoint, monkeypatch):
    import hymtl.inference as inference
    from hymtl.model import load_checkpoint

    for native, expected in ((True, "bf16"), (False, "32")):
        monkeypatch.setattr(inference, "native_bf16", lambda device="cpu", native=native: native)
        assert inference.TorchPredictor(load_checkpoint(tiny_checkpoint), precision="auto").precision == expected
    assert inference.checked_precision(32) == "32"  # as Hydra parses precision=32


@pytest.mark.slow
def test_cli_precision_garbage_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    images = tiny_checkpoint.parent / "images" / "val"
    result = run_predict(f"ckpt_path={tiny_checkpoint}", f"inputs=[{images}]", "precision=garbage", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: precision must be one of auto, 32, bf16, got garbage"]

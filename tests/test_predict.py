"""hymtl.predict: input collection, batched prediction, the three output formats, skipped images."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from hymtl.inference import collect_inputs, format_result, load_predictor, predict


def run_predict(*overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hymtl.predict", *overrides], cwd=cwd,
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
    explicit = tmp_path / "c.data"  # an explicit file is taken whatever its extension
    explicit.write_bytes(b"x")

    files, skipped = collect_inputs([
        str(tmp_path / "a"), str(tmp_path / "b" / "*"), str(explicit), str(tmp_path / "a" / "one.jpg"),
        str(tmp_path / "missing.jpg"), str(tmp_path / "nope" / "*.jpg"), str(tmp_path / "empty"),
    ])
    names = [Path(f).name for f in files]
    assert names == ["one.jpg", "two.PNG", "five.bmp", "four.jpg", "c.data"]  # a/ walked, then the glob; deduped
    assert {Path(s.path).name: s.reason for s in skipped} == {
        "missing.jpg": "no such file or folder", "*.jpg": "pattern matches no images", "empty": "folder holds no images",
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
        (["ckpt_path=CKPT", "inputs=[bad.jpg]"], "none of the 1 images could be read"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "format=xml"], "format must be one of table, csv, json"),
        (["ckpt_path=missing.ckpt", "inputs=[bad.jpg]"], "checkpoint not found: missing.ckpt"),
        (["ckpt_path=CKPT", "inputs=[bad.jpg]", "batch_size=0"], "batch_size must be a positive integer"),
    ],
)
def test_bad_input_raises_one_clear_error(tiny_checkpoint, tmp_path, monkeypatch, overrides, message):
    from hymtl.errors import HymtlError
    from hymtl.predict import run

    monkeypatch.chdir(tmp_path)  # relative inputs, as on a command line
    (tmp_path / "bad.jpg").write_text("not an image")
    cfg = compose_predict(*(o.replace("CKPT", str(tiny_checkpoint)) for o in overrides), "num_workers=0")
    with pytest.raises(HymtlError) as info:
        run(cfg)
    assert str(info.value).startswith(message)


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    result = run_predict("ckpt_path=missing.ckpt", "inputs=[bad.jpg]", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: checkpoint not found: missing.ckpt"]

"""benchmarks/gpu_check.py: its CPU subset end to end on the real ants/bees data, and its parsers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    return load_script(SCRIPT, "gpu_check")


def test_tutorial_lines_are_parsed_from_a_runs_output():
    gpu_check = _module()
    text = "noise\nloss 0.333, train acc 0.865, test acc 0.922\n35.0 examples/sec on cuda:0\nmore\n"
    lines = gpu_check.tutorial_lines(text)
    assert lines["test_acc"] == pytest.approx(0.922) and lines["examples_per_sec"] == pytest.approx(35.0)
    assert lines["device"] == "cuda:0"
    assert gpu_check.tutorial_lines("no summary here") is None


def test_only_missing_distributions_are_installed():
    gpu_check = _module()
    assert gpu_check.missing_distributions(["pytest", "no-such-distribution-hymtl"]) == ["no-such-distribution-hymtl"]


@pytest.mark.slow
@pytest.mark.realdata
def test_cpu_subset_runs_end_to_end_and_reports_what_it_skipped(real_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--data", str(real_data), "--out", str(out),
                             "--budget-s", "3000"], cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    assert set(rows) == {"install", "DataLoader decode + resize", "train step alone",
                         "train frozen (1 epoch, 2 batches)", "bound"}
    assert all(r["status"] == "ok" for r in rows.values())
    for step in ("DataLoader decode + resize", "train step alone", "train frozen (1 epoch, 2 batches)"):
        assert rows[step]["images_per_s"] > 0
    assert "test acc" in rows["train frozen (1 epoch, 2 batches)"]["detail"]
    assert "examples/sec on cpu" in rows["train frozen (1 epoch, 2 batches)"]["detail"]
    assert "bounds the run" in rows["bound"]["detail"]
    skipped = "\n".join(report["skipped"])
    for what in ("GPU decode", "train finetune", "train two_phase", "finetune epoch", "predict/export parity",
                 "DDP check skipped"):
        assert what in skipped
    # the printed table: markdown rows, the skipped list and the command that reproduces it
    table = (out / "results.md").read_text()
    assert table in result.stdout
    assert "| step | status | images/s | wall s | detail |" in table
    assert "| train frozen (1 epoch, 2 batches) | ok |" in table
    assert "skipped:\n- GPU decode" in table
    assert "reproduce: `" in table and "gpu_check.py" in table


@pytest.mark.slow
def test_a_failed_step_makes_the_exit_code_non_zero(tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--data", str(tmp_path / "missing"),
                             "--out", str(out), "--budget-s", "2000"], cwd=REPO, capture_output=True, text=True,
                            timeout=2400)
    assert result.returncode == 1, result.stdout[-3000:]
    rows = {r["step"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["floor"]["status"] == "FAILED"
    assert rows["train frozen (1 epoch, 2 batches)"]["status"] == "FAILED"
    assert "| train frozen (1 epoch, 2 batches) | FAILED |" in result.stdout

"""benchmarks/time_to_accuracy.py: the table it prints (whole-process and CPU seconds, the ratio
against the classic recipe, the load average) and the floor row's process, on a tiny folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script(REPO / "benchmarks" / "time_to_accuracy.py", "bench_time")


def test_the_table_has_process_and_cpu_seconds_the_ratio_by_process_time_and_the_load(bench):
    info = {"machine": "x86_64", "cores": 2, "torch": "2.x", "when": "now", "load_before": 0.25, "load_after": 1.5}
    rows = [
        {"name": "partial", "classic_of": "classic", "process_s": 30.0, "cpu_s": 47.0, "wall_s": 21.0,
         "images_per_s": 70.0, "test_acc": 0.974, "peak_rss_gb": 1.6, "backbone": "lite0", "command": "a"},
        {"name": "classic", "process_s": 720.0, "cpu_s": 1396.0, "wall_s": 711.0, "test_acc": 0.954,
         "peak_rss_gb": 1.4, "backbone": "lite0", "command": "b"},
        {"name": "broken", "classic_of": "classic", "process_s": 3.0, "cpu_s": 2.0, "peak_rss_gb": 0.5,
         "returncode": 2, "error": "boom", "command": "c"},
    ]
    table = bench.markdown(rows, None, info)
    assert "load average (1 min) 0.25 before, 1.50 after" in table
    assert "| partial | lite0 | 30.0 | 47.0 | 21.0 | 70.0 | 0.974 | 1.60 | 24.0x faster, acc +0.020 |" in table
    assert "| broken | | failed (rc 2) |" in table
    assert "- classic: `b`" in table


@pytest.mark.slow
def test_the_floor_process_decodes_and_runs_every_train_and_test_image_once(tiny_folder):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--floor-process",
                             "--data", str(tiny_folder)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HYMTL_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "floor: 24 images decoded and run once" in result.stdout  # 12 train + 12 val (= test) images

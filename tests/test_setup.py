"""scripts/setup.sh's choice of torch build, run for real with a stand-in ``python`` that records
what pip was asked to do (installing torch itself is the one thing a test cannot afford)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for .venv/bin/python: "import torch" fails (nothing installed yet); pip calls are recorded
echo "$*" >> "$FAKE_LOG"
case "$*" in
  "-c import torch, torchvision") exit 1 ;;
  "-m pip index versions torch"*) [ -n "$FAKE_CPU_VERSIONS" ] && echo "Available versions: $FAKE_CPU_VERSIONS"; exit 0 ;;
  "-m pip install -q torch==2.14.1+cpu"*) [ -z "$FAKE_CPU_INSTALL_FAILS" ] ;;
  *) exit 0 ;;
esac
"""

GPU_HERE = shutil.which("nvidia-smi") is not None or bool(glob.glob("/dev/nvidia*")) or os.path.exists("/dev/kfd")


def _setup(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    log = tmp_path / "calls.log"
    result = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], capture_output=True, text=True,
                            timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FAKE_LOG": str(log), **env})
    return result, log.read_text().splitlines() if log.exists() else []


def _torch_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install -q torch")]


@pytest.mark.skipif(GPU_HERE, reason="the automatic CPU build is for machines without a GPU")
def test_without_a_gpu_the_setup_installs_the_cpu_build_when_the_cpu_index_has_it(tmp_path):
    result, calls = _setup(tmp_path, FAKE_CPU_VERSIONS="2.14.1+cpu, 2.13.0+cpu")
    assert result.returncode == 0, result.stderr
    assert _torch_installs(calls) == [
        "-m pip install -q torch==2.14.1+cpu torchvision==0.29.1+cpu --index-url https://download.pytorch.org/whl/cpu"]
    assert "installing the CPU build of torch" in result.stdout


@pytest.mark.skipif(GPU_HERE, reason="the automatic CPU build is for machines without a GPU")
@pytest.mark.parametrize("case", ["index unreachable", "install fails"])
def test_the_setup_falls_back_to_the_default_build_and_never_fails_for_it(tmp_path, case):
    env = {"FAKE_CPU_VERSIONS": ""} if case == "index unreachable" else {
        "FAKE_CPU_VERSIONS": "2.14.1+cpu", "FAKE_CPU_INSTALL_FAILS": "1"}
    result, calls = _setup(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert _torch_installs(calls)[-1] == "-m pip install -q torch==2.14.1 torchvision==0.29.1"
    assert "installing the default build" in result.stdout


@pytest.mark.parametrize("env, expected", [
    ({"TORCH_INDEX": "https://example.org/whl/cu126"},
     "-m pip install -q torch==2.14.1 torchvision==0.29.1 --index-url https://example.org/whl/cu126"),
    ({"TORCH_INDEX": ""}, "-m pip install -q torch==2.14.1 torchvision==0.29.1"),
    ({"TORCH_SPEC": "torch==2.13.0 torchvision==0.28.0"}, "-m pip install -q torch==2.13.0 torchvision==0.28.0"),
])
def test_torch_index_and_torch_spec_turn_the_choice_off(tmp_path, env, expected):
    result, calls = _setup(tmp_path, FAKE_CPU_VERSIONS="2.14.1+cpu", **env)
    assert result.returncode == 0, result.stderr
    assert _torch_installs(calls) == [expected]
    assert not any(c.startswith("-m pip index") for c in calls)

"""Where the configs are, and what the hardware supports (precision, cuDNN).

Lowest layer beside ``errors``/``fileio``: imports nothing of ours, and torch only when a
function needs it (``config_dir`` is read before ``--help``).
"""

from __future__ import annotations

from pathlib import Path


_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """Absolute path of ``conf/``: inside the wheel after ``pip install .``, else the checkout's top level."""
    shipped = _PACKAGE_DIR / "conf"
    return str(shipped if shipped.is_dir() else _PACKAGE_DIR.parent / "conf")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (bf16 matmuls in hardware)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def auto_precision(accelerator: str = "auto") -> str:
    """Lightning precision for this machine: bf16/16 mixed on CUDA, bf16 mixed on CPUs with
    native bf16, else fp32."""
    import torch

    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def configure_backends() -> None:
    """cuDNN autotuning for fixed-size batches; TF32 matmuls on Ampere+."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def device_name(trainer) -> str:
    """"cpu", "cuda:0" or "2x cuda" — for the tutorial's "examples/sec on …" line."""
    root = trainer.strategy.root_device
    if trainer.world_size > 1:
        return f"{trainer.world_size}x {root.type}"
    return str(root)


def on_cpu_only(value, accelerator: str = "auto"):
    """``value`` when the run trains on a CPU (``accelerator`` ``cpu``, or ``auto`` without
    CUDA), else ``None``: ``mode=auto``'s default budget (5 minutes on a CPU, none on a GPU)."""
    import torch

    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return None if on_gpu else value

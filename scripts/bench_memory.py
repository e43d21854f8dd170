"""Resident memory of a training run over a folder of many large images (images stream from disk).

    .venv/bin/python scripts/bench_memory.py --images 3000 --compare 300 --size 2000x1500

Generates ``--images`` JPEGs of ``--size`` pixels in two classes (once; reused on a second call),
trains one epoch of ``mode=finetune model=efficientnet_lite0 model.pretrained=false`` on them with
``python -m hymtl.train`` and samples, every 0.2 s, the proportional set size (PSS: shared pages
split between the processes that share them) of the training process plus its DataLoader
workers. Does the same on the first ``--compare`` images: memory that stays flat while the
folder grows tenfold is bounded by the batch, not the dataset. Prints one JSON line per run.

Not a test (it writes ~1 GB and takes minutes); the figure belongs in the issue's closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, count: int, size: tuple[int, int]) -> int:
    """``count`` JPEGs split over ants/bees (train) and 10% val; returns the bytes on disk."""
    from PIL import Image

    total = 0
    rng = random.Random(0)
    small = (size[0] // 16, size[1] // 16)
    for i in range(count):
        split = "val" if i % 10 == 0 else "train"
        cls = "ants" if i % 2 else "bees"
        path = root / split / cls / f"img_{i:05d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # blocks of random colour, upscaled smoothly: photo-like file sizes, fast to make
            noise = Image.frombytes("RGB", small, rng.randbytes(small[0] * small[1] * 3))
            image = noise.resize(size, Image.Resampling.BICUBIC)
            image.save(path, "JPEG", quality=85)
        total += path.stat().st_size
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(root: Path, out: Path, workers: int, batch_size: int, limit: str | None) -> dict:
    cmd = [sys.executable, "-m", "hymtl.train", "model=efficientnet_lite0", "model.pretrained=false",
           "mode=finetune", "mode.epochs=1", "data=folder", f"data.root={root}", f"data.num_workers={workers}",
           f"data.batch_size={batch_size}", "test=false", "callbacks.test_figures=null", f"hydra.run.dir={out}"]
    if limit:
        cmd.append(f"+trainer.limit_train_batches={limit}")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_total = 0
    while proc.poll() is None:
        pids = [proc.pid]
        for pid in pids:  # the whole tree: workers are children of the main process
            pids.extend(p for p in _children(pid) if p not in pids)
        main = _pss_kib(proc.pid)
        total = main + sum(_pss_kib(p) for p in pids[1:])
        peak_main, peak_total = max(peak_main, main), max(peak_total, total)
        time.sleep(0.2)
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"peak_pss_main_mib": round(peak_main / 1024), "peak_pss_total_mib": round(peak_total / 1024),
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--compare", type=int, default=300, help="a run on this many images first (0: none)")
    parser.add_argument("--size", default="2000x1500")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-train-batches", default=None, help="cap the epoch (time), e.g. 40")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hymtl-bench-memory")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    for count in [c for c in (args.compare, args.images) if c]:
        root = args.dir / f"images_{count}"
        made = time.perf_counter()
        disk = make_images(root, count, size)
        made = time.perf_counter() - made
        result = run(root, args.dir / f"run_{count}_{int(time.time())}", args.workers, args.batch_size,
                     args.limit_train_batches)
        print(json.dumps({"images": count, "size": args.size, "disk_mib": round(disk / 2**20),
                          "workers": args.workers, "batch_size": args.batch_size,
                          "limit_train_batches": args.limit_train_batches, "generate_s": round(made, 1), **result}),
              flush=True)


if __name__ == "__main__":
    main()

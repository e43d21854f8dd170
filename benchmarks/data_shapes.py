"""Imbalanced classes and several labels per image, measured on ants/bees.

    .venv/bin/python benchmarks/data_shapes.py --data ../shared/data/hymenoptera_data

Two tables, each row a ``python -m hymtl.train`` process (efficientnet_lite0, ImageNet weights):

* **imbalance** — ants/bees with the training bees cut to one in ten (ants 124, bees 12: 1:10;
  val unchanged, 70/83): the default, ``data.sampler=balanced`` and ``model.class_weights=auto``,
  each over ``--seeds`` seeds, in ``mode=frozen`` (and ``--modes``): test accuracy and test macro
  accuracy (the mean of the per-class accuracies: what a dead minority class pulls down).
* **multilabel** — two ants/bees photos side by side, labelled with the set of classes shown
  (240 train pairs from train/, 120 val pairs from val/): ``task=multilabel`` in every regime:
  test micro F1, macro F1, mAP and the run's seconds (whole process).

The load average (1 min) is printed before and after each table; run it alone on the machine.
``--quick``: one seed, two modes, fewer pairs (a smoke run: its numbers are not the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model=efficientnet_lite0", "data.num_workers=2"]


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def run(overrides: list[str], cwd: Path, env: dict) -> tuple[dict, float]:
    """One ``hymtl.train`` process: its metrics.json and whole-process seconds."""
    run_dir = cwd / f"run{time.time_ns()}"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hymtl.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(overrides)}\n{result.stderr[-2000:]}")
    return json.loads((run_dir / "metrics.json").read_text()), seconds


def imbalanced_folder(data: Path, out: Path) -> Path:
    """ants/bees with one training bee in ten (symlinks: no image copied)."""
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            images = sorted((data / split / cls).glob("*.jpg"))
            if split == "train" and cls == "bees":
                images = images[::10]
            target = out / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for image in images:
                (target / image.name).symlink_to(image.resolve())
    return out


def side_by_side(data: Path, out: Path, train_pairs: int, val_pairs: int) -> Path:
    """Pairs of photos side by side and ``labels.csv`` (filename, labels, split)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count, seed in (("train", train_pairs, 0), ("val", val_pairs, 1)):
        sources = sorted((data / split).glob("*/*.jpg"))
        rng = random.Random(seed)
        for i in range(count):
            left, right = rng.choice(sources), rng.choice(sources)
            with Image.open(left) as a, Image.open(right) as b:
                canvas = Image.new("RGB", (320, 160))
                canvas.paste(a.convert("RGB").resize((160, 160)), (0, 0))
                canvas.paste(b.convert("RGB").resize((160, 160)), (160, 0))
                name = f"{split}{i:04d}.jpg"
                canvas.save(out / name, quality=90)
            rows.append(f"{name},{'|'.join(sorted({left.parent.name, right.parent.name}))},{split}")
    (out / "labels.csv").write_text("filename,labels,split\n" + "\n".join(rows) + "\n")
    return out / "labels.csv"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def imbalance_table(data: Path, work: Path, seeds: list[int], modes: list[str], env: dict) -> list[str]:
    root = imbalanced_folder(data, work / "imbalanced")
    variants = {"default": [], "data.sampler=balanced": ["data.sampler=balanced"],
                "model.class_weights=auto": ["model.class_weights=auto"]}
    lines = [f"load average before: {load()}", "",
             "| mode | variant | test acc | test acc macro | seeds |", "|---|---|---:|---:|---:|"]
    for mode in modes:
        for name, extra in variants.items():
            acc, macro = [], []
            for seed in seeds:
                metrics, _ = run([f"mode={mode}", "data=folder", f"data.root={root}", f"seed={seed}", *extra], work, env)
                acc.append(metrics["test/acc"])
                macro.append(metrics["test/acc_macro"])
            lines.append(f"| {mode} | {name} | {mean_std(acc)} | {mean_std(macro)} | {len(seeds)} |")
            print(lines[-1], flush=True)
    lines += ["", f"load average after: {load()}"]
    return lines


def multilabel_table(data: Path, work: Path, modes: list[str], pairs: tuple[int, int], env: dict) -> list[str]:
    table = side_by_side(data, work / "pairs", *pairs)
    lines = [f"load average before: {load()}", "",
             "| mode | test f1 micro | test f1 macro | test mAP | exact match | seconds (process) |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in modes:
        metrics, seconds = run([f"mode={mode}", "task=multilabel", "data=table", f"data.file={table}"], work, env)
        lines.append(f"| {mode} | {metrics['test/f1_micro']:.3f} | {metrics['test/f1_macro']:.3f} | "
                     f"{metrics['test/map']:.3f} | {metrics['test/exact_match']:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"load average after: {load()}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=("imbalance", "multilabel"), default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, two modes, fewer pairs")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    seeds = [0] if args.quick else list(range(args.seeds))
    with tempfile.TemporaryDirectory(prefix="hymtl-shapes.") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HYMTL_CACHE_DIR": str(work / "cache")}
        out = []
        if args.only in (None, "imbalance"):
            modes = ["frozen"] if args.quick else ["frozen", "partial"]
            out += ["## Imbalance (ants/bees, training bees cut to 1 in 10)", ""]
            out += imbalance_table(args.data, work, seeds, modes, env) + [""]
        if args.only in (None, "multilabel"):
            modes = ["frozen", "partial"] if args.quick else ["frozen", "partial", "two_phase", "finetune"]
            pairs = (60, 30) if args.quick else (240, 120)
            out += ["## Multi-label (ants/bees photos side by side; labels: the classes shown)", ""]
            out += multilabel_table(args.data, work, modes, pairs, env)
    print("\n".join(out))


if __name__ == "__main__":
    main()

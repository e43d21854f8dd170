"""Time to accuracy on ants/bees: this project's defaults vs the classic tutorial recipe.

    .venv/bin/python benchmarks/time_to_accuracy.py --data ../shared/data/hymenoptera_data

For each configuration it runs ``python -m hymtl.train`` in a fresh process and reports:

* process s: the whole command, interpreter start and imports included (what a user waits);
* CPU s: user + system CPU time of the process and its workers (``wait4``): on a 2-core machine
  a run near 2x its process time used both cores;
* in-run wall s: model load + decoding + training + test, as measured inside ``hymtl.train.train``
  (``metrics.json: wall_time_s``; Python imports excluded);
* images/s: training images processed per second of that wall time (epochs x train images / wall);
* test accuracy (the best checkpoint on the test split; ants/bees: val doubles as test);
* peak memory: the largest resident set of the run's processes (``wait4`` ru_maxrss).

Rows: ``floor``, ``frozen`` (cold feature cache, then a warm rerun), ``two_phase``, ``partial``
(the default top stage: cold, then warm; and the top 2 stages), ``finetune``
(``model=efficientnet_lite0``, the offline backbone, and ``frozen`` with ``efficientnet_lite2``),
beside the classic recipe run in the same invocation (batch 4, SGD lr 1e-3 momentum 0.9, StepLR
7/0.1, 25 epochs, fp32, no feature cache, same backbone and data), with the ratios.

The ``floor`` row is a process that only decodes every train and test image once (two workers,
reduced-scale JPEG decoding) and runs one forward pass of the backbone on each (bf16 autocast
where the CPU has native bf16, channels-last, simplified as the feature extractor runs it:
:mod:`hymtl.simplify`): the least any mode that looks at every image once must spend. The load
average (1 min) is printed before and after, into the table.

Then the floor's parts, in-process: decode-only (DataLoader + eval transforms, no model), forward-only
(random batches; fp32 / bf16 autocast x contiguous / channels-last, and channels-last
simplified), training steps (fp32 vs
bf16), and predict throughput (files -> probabilities, decoding included).

Writes ``<out>/results.json`` and ``<out>/results.md`` (the table) after every row, so a long
run that is cut short still leaves its numbers. ``--quick`` runs a reduced version (classic
recipe for 2 epochs, no lite2) for development: its numbers are not the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLASSIC = [
    "mode.lr=1e-3", "mode.head_lr_mult=1", "mode.backbone_lr_mult=1", "mode.optimizer.momentum=0.9",
    "mode.optimizer.weight_decay=0", "mode.scheduler._target_=hymtl.model.step_schedule",
    "data.batch_size=4", "trainer.precision=32-true", "model.channels_last=false",
    "mode.precompute_features=false",
]


def measured(cmd: list[str], log_path: Path, env: dict) -> dict:
    """Run ``cmd``; its return code, whole-process wall and CPU seconds and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # usage covers the process and the workers it waited for
    return {"process_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss / 1024**2, "returncode": os.waitstatus_to_exitcode(status)}


def run_config(name: str, overrides: list[str], data: str, out: Path, env: dict) -> dict:
    """One ``python -m hymtl.train`` run; its metrics plus process time, CPU time, peak RSS and the command."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "hymtl.train", *overrides, f"data.root={data}", f"hydra.run.dir={run_dir}"]
    log_path = out / "runs" / f"{name}.log"
    row = {"name": name, "command": "python -m hymtl.train " + " ".join(shlex.quote(o) for o in overrides),
           **measured(cmd, log_path, env)}
    metrics_path = run_dir / "metrics.json"
    if row["returncode"] != 0 or not metrics_path.is_file():
        row["error"] = log_path.read_text()[-1500:]
        return row
    m = json.loads(metrics_path.read_text())
    row.update(wall_s=m["wall_time_s"], test_acc=m.get("test/acc"), epochs=m.get("epochs"),
               backbone=m.get("backbone"), mode=m.get("mode"))
    return row


def train_images(data: str) -> int:
    from hymtl.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root=data)
    dm.preprocessing = __import__("hymtl.backbones", fromlist=["get_spec"]).get_spec("efficientnet_lite0").preprocessing
    dm.setup()
    return len(dm.train_samples)


# --------------------------------------------------------------------------- the floor
def floor_process(data: str) -> None:
    """The floor row's process: decode every train and test image once, one forward pass each."""
    import torch
    from torch.utils.data import DataLoader

    from hymtl.backbones import create_backbone
    from hymtl.data import ImageFolderDataModule, ImageSampleDataset, build_transforms
    from hymtl.runtime import cpu_has_native_bf16
    from hymtl.simplify import simplify_for_inference

    backbone = create_backbone("efficientnet_lite0")
    size = backbone.preprocessing.input_size
    # the cheapest forward hymtl knows: the network simplified as the feature extractor runs it
    model, _ = simplify_for_inference(backbone.model.eval().to(memory_format=torch.channels_last),
                                      torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last))
    dm = ImageFolderDataModule(root=data, preprocessing=backbone.preprocessing)
    dm.setup()
    ds = ImageSampleDataset(list(dm.train_samples) + list(dm.test_samples),
                            build_transforms(backbone.preprocessing, train=False))
    ds.decode_size = backbone.preprocessing.resize_size
    seen = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
        for images, _ in DataLoader(ds, batch_size=64, num_workers=2):
            model(images.contiguous(memory_format=torch.channels_last))
            seen += len(images)
    print(f"floor: {seen} images decoded and run once")


def floor(data: str, quick: bool) -> dict:
    """Decode-only, forward-only, train-step and predict rates, measured in this process."""
    import torch
    from torch.utils.data import DataLoader

    from hymtl.backbones import create_backbone
    from hymtl.data import ImageFolderDataModule, ImageSampleDataset, build_transforms
    from hymtl.simplify import simplify_for_inference

    results: dict = {"threads": torch.get_num_threads()}
    backbone = create_backbone("efficientnet_lite0")
    pre = backbone.preprocessing
    dm = ImageFolderDataModule(root=data, preprocessing=pre)
    dm.setup()
    samples = dm.val_samples

    def rate(fn, n_items: int, repeat: int = 2) -> float:
        fn()  # warm-up (worker start, allocator, oneDNN kernels)
        best = 0.0
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = max(best, n_items / (time.perf_counter() - t))
        return best

    for workers in (0, 2):
        for draft in (False, True):
            ds = ImageSampleDataset(samples, build_transforms(pre, train=False))
            ds.decode_size = pre.resize_size if draft else None
            loader = DataLoader(ds, batch_size=32, num_workers=workers, persistent_workers=workers > 0)
            results[f"decode_workers{workers}_{'draft' if draft else 'full'}"] = rate(lambda: [b for b in loader], len(ds), 1)

    model = backbone.model.eval()
    head = torch.nn.Linear(backbone.num_features, 2)
    n = 32 if quick else 64
    x = torch.randn(n, 3, pre.input_size, pre.input_size)
    for cl in (False, True):
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        for dtype in (None, torch.bfloat16):
            def fwd():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    model(xx)
            results[f"forward_{'channels_last' if cl else 'contiguous'}_{'bf16' if dtype else 'fp32'}"] = rate(fwd, n)

    simplified, _ = simplify_for_inference(model, x[:2].contiguous(memory_format=torch.channels_last))
    xx = x.contiguous(memory_format=torch.channels_last)
    for dtype in (None, torch.bfloat16):
        def fwd_simplified():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                simplified(xx)
        results[f"forward_channels_last_{'bf16' if dtype else 'fp32'}_simplified"] = rate(fwd_simplified, n)

    # training steps (backbone + head, SGD) at batch 16, channels-last
    model.train().to(memory_format=torch.channels_last)
    xt = torch.randn(16, 3, pre.input_size, pre.input_size).contiguous(memory_format=torch.channels_last)
    yt = torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=1e-4, momentum=0.9)
    for dtype in (None, torch.bfloat16):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(head(model(xt)), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[f"train_step_{'bf16' if dtype else 'fp32'}"] = rate(lambda: [step() for _ in range(2)], 32, 1)

    # predict: files -> probabilities (decode + transforms in 2 workers, bf16, channels-last)
    model.eval()
    ds = ImageSampleDataset(samples, build_transforms(pre, train=False))
    ds.decode_size = pre.resize_size
    loader = DataLoader(ds, batch_size=64, num_workers=2, persistent_workers=True)

    def predict():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for images, _ in loader:
                head(model(images.contiguous(memory_format=torch.channels_last))).float().softmax(-1)

    results["predict_bf16_channels_last"] = rate(predict, len(ds), 1)
    return results


# --------------------------------------------------------------------------- report
def fmt(v, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict], floor_results: dict | None, info: dict) -> str:
    by = {r["name"]: r for r in rows}
    load = f"load average (1 min) {fmt(info.get('load_before'), '.2f')} before, {fmt(info.get('load_after'), '.2f')} after"
    lines = [
        f"Machine: {info['machine']}; {info['cores']} cores; torch {info['torch']}; {info['when']}; {load}"
        + (f"; **{info['note']}**" if info.get("note") else ""),
        "",
        "| run | backbone | process s | CPU s | in-run wall s | images/s | test acc | peak RSS GB | vs classic (process) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        classic = by.get(r.get("classic_of") or "")
        if classic and classic.get("process_s") and r.get("process_s") and "error" not in classic and "error" not in r:
            ratio = f"{classic['process_s'] / r['process_s']:.1f}x faster"
            if r.get("test_acc") is not None and classic.get("test_acc") is not None:
                ratio += f", acc {r['test_acc'] - classic['test_acc']:+.3f}"
        else:
            ratio = ""
        if "error" in r:
            lines.append(f"| {r['name']} | | failed (rc {r['returncode']}) | | | | | {fmt(r['peak_rss_gb'], '.2f')} | |")
            continue
        lines.append(f"| {r['name']} | {r.get('backbone', '')} | {fmt(r.get('process_s'))} | {fmt(r.get('cpu_s'))} | "
                     f"{fmt(r.get('wall_s'))} | {fmt(r.get('images_per_s'))} | {fmt(r.get('test_acc'), '.3f')} | "
                     f"{fmt(r.get('peak_rss_gb'), '.2f')} | {ratio} |")
    if floor_results:
        lines += ["", "Floor parts (efficientnet_lite0, images/s, best of 2, in-process):", "",
                  "| measurement | images/s |", "|---|---:|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in floor_results.items() if k != "threads"]
    lines += ["", "Commands (run from the repository root, `data.root=` added):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    parser.add_argument("--quick", action="store_true", help="reduced settings for development (not the benchmark)")
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--classic-epochs", type=int, default=25,
                        help="epochs of the classic recipe (25 is the recipe; fewer only to save time)")
    parser.add_argument("--note", default="", help="e.g. 'CPU shared with other jobs'")
    parser.add_argument("--floor-process", action="store_true", help=argparse.SUPPRESS)  # the floor row's child
    args = parser.parse_args()
    if args.floor_process:
        floor_process(str(Path(args.data).resolve()))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())

    import torch

    info = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note,
            "load_before": os.getloadavg()[0]}
    print(f"load average before: {os.getloadavg()}", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="hymtl-bench-cache-"))  # a cold cache for the first frozen run
    env = {**os.environ, "HYMTL_CACHE_DIR": str(cache), "HYMTL_OFFLINE": "1"}
    lite0 = ["model=efficientnet_lite0"]
    classic_epochs = 2 if args.quick else args.classic_epochs
    ce = f" ({classic_epochs} ep)" if classic_epochs != 25 else ""
    configs = [  # in order of importance: a run cut short keeps the first rows
        ("floor", None),  # decode + one forward per image: the least a mode can cost
        ("frozen", ["mode=frozen", *lite0]),
        ("frozen (warm cache)", ["mode=frozen", *lite0]),
        ("two_phase", ["mode=two_phase", *lite0]),
        ("partial", ["mode=partial", *lite0]),  # the default: the top stage (conv_head) on cached activations
        ("partial (warm cache)", ["mode=partial", *lite0]),
        ("partial (top 2 stages)", ["mode=partial", "mode.trainable_stages=2", *lite0]),
        ("finetune", ["mode=finetune", *lite0]),
        ("classic frozen" + ce, ["mode=frozen", *lite0, *CLASSIC, f"mode.epochs={classic_epochs}"]),
        ("frozen lite2", ["mode=frozen", "model=efficientnet_lite2", "mode.feature_views=0"]),
        ("classic finetune" + ce, ["mode=finetune", *lite0, *CLASSIC, f"mode.epochs={classic_epochs}"]),
        # the defaults' alternatives; a row after a run that filled the cache for it reads it warm
        ("frozen (0 views)", ["mode=frozen", "mode.feature_views=0", *lite0]),
        ("partial (0 views)", ["mode=partial", "mode.feature_views=0", *lite0]),
    ]
    if args.quick:
        configs = [c for c in configs if c[0] != "frozen lite2"]
    classic_of = {"frozen": "classic frozen" + ce, "frozen (warm cache)": "classic frozen" + ce,
                  "frozen lite2": "classic frozen" + ce, "finetune": "classic finetune" + ce,
                  "two_phase": "classic finetune" + ce, "partial": "classic finetune" + ce,
                  "partial (warm cache)": "classic finetune" + ce, "partial (top 2 stages)": "classic finetune" + ce,
                  "frozen (0 views)": "classic frozen" + ce, "partial (0 views)": "classic finetune" + ce}
    n_train = train_images(data)
    rows: list[dict] = []
    floor_results = None

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"info": info, "rows": rows, "floor": floor_results}, indent=2))
        (out / "results.md").write_text(markdown(rows, floor_results, info))

    for name, overrides in configs:
        if args.only and name not in args.only:
            continue
        print(f"running {name}: {' '.join(overrides or ['decode + one forward per image'])}", flush=True)
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        if overrides is None:
            row = {"name": name, "command": f"python benchmarks/time_to_accuracy.py --floor-process --data {data}",
                   **measured([sys.executable, __file__, "--floor-process", "--data", data], out / "runs" / f"{slug}.log", env)}
            if row["returncode"]:
                row["error"] = (out / "runs" / f"{slug}.log").read_text()[-1500:]
        else:
            row = run_config(slug, overrides, data, out, env)
        row["name"], row["classic_of"] = name, classic_of.get(name)
        if row.get("wall_s") and row.get("epochs"):
            row["images_per_s"] = row["epochs"] * n_train / row["wall_s"]
        rows.append(row)
        save()
        print(f"  process {fmt(row.get('process_s'))} s, CPU {fmt(row.get('cpu_s'))} s, test acc {fmt(row.get('test_acc'), '.3f')}, "
              f"peak RSS {row['peak_rss_gb']:.2f} GB" + (f"  FAILED: {row['error'][-300:]}" if "error" in row else ""),
              flush=True)
    if not args.no_floor:
        print("measuring the floor's parts", flush=True)
        floor_results = floor(data, args.quick)
    info["load_after"] = os.getloadavg()[0]
    print(f"load average after: {os.getloadavg()}", flush=True)
    save()
    print(markdown(rows, floor_results, info))
    print(f"reproduce: .venv/bin/python benchmarks/time_to_accuracy.py --data {args.data}" + (" --quick" if args.quick else ""))
    print(f"results in {out}")


if __name__ == "__main__":
    main()

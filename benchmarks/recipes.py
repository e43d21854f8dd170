"""Each toolbox recipe off and on, per regime and folder: accuracy and time (issue 28, item 5).

    .venv/bin/python benchmarks/recipes.py --data ../shared/data/hymenoptera_data ~/.cache/hymtl/bench_folders/*
        [--modes frozen partial two_phase finetune] [--recipes augment=trivial callbacks=ema ...] [--tta flip five_crop]

For every folder and regime (``mode=…``, ``model=efficientnet_lite0``) it trains the baseline
(the regime's defaults: ``augment=default``, no EMA) and then each recipe as one override on
top of it, every run in a fresh process (``python -m hymtl.train``, timed as
``benchmarks/time_to_accuracy.py`` times its rows: whole process, CPU, peak memory), and reads
``test/acc`` from the run's ``metrics.json``. Test-time augmentation is no training recipe: the
baseline's best checkpoint is scored by ``python -m hymtl.eval tta=<view>`` (the plain accuracy
and the TTA accuracy come from the same eval, the time is eval's whole process).

Recipes (default): ``augment=none``, ``augment=trivial``, ``augment=randaug``, ``callbacks=ema``
(``callbacks.ema.decay=0.99`` as well: short runs), ``mode.mixup=0.2``, ``mode.cutmix=1.0`` (not
for ``frozen`` and ``two_phase``: they train on cached pooled features, which have no image area
to cut: ``hymtl.mixing``), then ``tta=flip`` and ``tta=five_crop``.
Each row: folder, mode, recipe, test acc, its difference to the baseline, process s, CPU s,
peak GB. ``<out>/results.json`` and ``<out>/results.md`` are rewritten after every row (a run
cut short keeps its rows). A recipe earns "on by default" only where it wins across folders:
the ``wins`` column of the summary counts the folders where it beat the baseline per mode.

``--quick`` (one epoch, ``+trainer.limit_train_batches=2``, ``+trainer.limit_val_batches=1``)
checks that the script works; its numbers are not the benchmark. The machine must be quiet for
the times to mean anything (``--note`` goes into the table).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("frozen", "partial", "two_phase", "finetune")
RECIPES = ("augment=none", "augment=trivial", "augment=randaug", "callbacks=ema",
           "callbacks=ema callbacks.ema.decay=0.99", "mode.mixup=0.2", "mode.cutmix=1.0")
#: regimes that train on cached pooled features (hymtl.mixing: cutmix stops there with one line)
POOLED_FEATURES = ("frozen", "two_phase")
TTA = ("flip", "five_crop")
QUICK = ["mode.epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "data.batch_size=4"]


def _timing():
    """``measured`` of benchmarks/time_to_accuracy.py: one way to time a process."""
    spec = importlib.util.spec_from_file_location("time_to_accuracy", Path(__file__).with_name("time_to_accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measured


def train_row(measured, folder: Path, mode: str, recipe: str, extra: list[str], out: Path, env: dict) -> dict:
    name = f"{folder.name}-{mode}-{recipe.replace(' ', '_').replace('=', '-') or 'baseline'}"
    run_dir = out / "runs" / name
    overrides = [f"mode={mode}", "model=efficientnet_lite0", "data=folder", f"data.root={folder}",
                 *recipe.split(), *extra]
    cmd = [sys.executable, "-m", "hymtl.train", *overrides, f"hydra.run.dir={run_dir}"]
    row = {"folder": folder.name, "mode": mode, "recipe": recipe or "baseline",
           "command": "python -m hymtl.train " + " ".join(shlex.quote(o) for o in overrides),
           **measured(cmd, out / "runs" / f"{name}.log", env)}
    metrics = run_dir / "metrics.json"
    if row["returncode"] != 0 or not metrics.is_file():
        row["error"] = (out / "runs" / f"{name}.log").read_text()[-1500:]
        return row
    m = json.loads(metrics.read_text())
    row.update(test_acc=m.get("test/acc"), wall_s=m.get("wall_time_s"), run_dir=str(run_dir),
               best=m.get("best_checkpoint") or _best(run_dir))
    return row


def _best(run_dir: Path) -> str | None:
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt")) or sorted((run_dir / "checkpoints").glob("*.ckpt"))
    return str(found[-1]) if found else None


def tta_row(measured, baseline: dict, folder: Path, tta: str, extra: list[str], out: Path, env: dict) -> dict:
    name = f"{folder.name}-{baseline['mode']}-tta-{tta}"
    eval_dir = out / "runs" / name
    overrides = [f"ckpt_path={baseline['best']}", f"data.root={folder}", f"tta={tta}",
                 *[o for o in extra if o.startswith("+trainer.limit_test")]]
    cmd = [sys.executable, "-m", "hymtl.eval", *overrides, f"hydra.run.dir={eval_dir}"]
    row = {"folder": folder.name, "mode": baseline["mode"], "recipe": f"tta={tta}",
           "command": "python -m hymtl.eval " + " ".join(shlex.quote(o) for o in overrides),
           **measured(cmd, out / "runs" / f"{name}.log", env)}
    report = eval_dir / "eval.json"
    if row["returncode"] != 0 or not report.is_file():
        row["error"] = (out / "runs" / f"{name}.log").read_text()[-1500:]
        return row
    result = json.loads(report.read_text())
    row.update(test_acc=result["tta"]["accuracy"], plain_acc=result["accuracy"])
    return row


def applies(recipe: str, mode: str) -> bool:
    """Whether ``recipe`` can run in ``mode``: cutmix needs images or activation maps, unless the
    recipe itself turns the feature cache off."""
    parts = recipe.split()
    cuts = any(p.startswith("mode.cutmix=") and p.split("=", 1)[1] not in ("0", "0.0") for p in parts)
    return not (cuts and mode in POOLED_FEATURES and "mode.precompute_features=false" not in parts)


def fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], info: dict) -> str:
    baseline = {(r["folder"], r["mode"]): r.get("test_acc") for r in rows if r["recipe"] == "baseline"}
    lines = [f"# Recipes off/on ({info['started']}; {info['note'] or 'no note'})", "",
             "| folder | mode | recipe | test acc | vs baseline | process s | CPU s | peak GB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    wins: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        base = r.get("plain_acc", baseline.get((r["folder"], r["mode"])))
        acc = r.get("test_acc")
        delta = acc - base if acc is not None and base is not None and r["recipe"] != "baseline" else None
        if delta is not None:
            tally = wins.setdefault((r["mode"], r["recipe"]), [0, 0])
            tally[0] += delta > 0
            tally[1] += 1
        lines.append(f"| {r['folder']} | {r['mode']} | {r['recipe']} | {fmt(acc)} | {fmt(delta, '+.3f')} | "
                     f"{fmt(r.get('process_s'), '.1f')} | {fmt(r.get('cpu_s'), '.1f')} | "
                     f"{fmt(r.get('peak_rss_gb'), '.2f')} |"
                     + (" failed" if r.get("error") else ""))
    lines += ["", "| mode | recipe | wins (folders where it beat the baseline) |", "|---|---|---|"]
    lines += [f"| {mode} | {recipe} | {won}/{total} |" for (mode, recipe), (won, total) in sorted(wins.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(REPO.parent / "shared" / "data" / "hymenoptera_data")])
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out", default=str(REPO / "outputs" / "benchmarks" / f"recipes_{stamp}"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help="overrides, one recipe per argument")
    parser.add_argument("--tta", nargs="*", default=list(TTA), choices=TTA)
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script (not the benchmark)")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    import os

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    extra = QUICK if args.quick else []
    measured = _timing()
    info = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "note": args.note + (" (--quick)" if args.quick else "")}
    rows: list[dict] = []

    def save() -> None:
        (out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        (out / "results.md").write_text(markdown(rows, info))

    for data in map(Path, args.data):
        for mode in args.modes:
            baseline = train_row(measured, data, mode, "", extra, out, env)
            rows.append(baseline)
            save()
            for recipe in (r for r in args.recipes if applies(r, mode)):
                rows.append(train_row(measured, data, mode, recipe, extra, out, env))
                save()
            for tta in args.tta if baseline.get("best") else []:
                rows.append(tta_row(measured, baseline, data, tta, extra, out, env))
                save()
    print(markdown(rows, info))
    print(f"saved {out / 'results.md'}")


if __name__ == "__main__":
    main()

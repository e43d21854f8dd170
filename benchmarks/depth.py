"""How deep to train, per folder: every fixed regime beside ``mode=auto`` (issue 30).

    .venv/bin/python benchmarks/folders.py --out /tmp/bf
    .venv/bin/python benchmarks/depth.py --out /tmp/depth \\
        ../shared/data/hymenoptera_data /tmp/bf/{digits,gray_lines,crops,imbalanced,many_classes,ten_class_3k}
        [--regimes frozen partial1 partial2 partial3 finetune two_phase auto] [--seeds 0 1 2] [--note TEXT]

Each row is one ``python -m hymtl.train model=efficientnet_lite0 data=folder data.root=<folder>
<regime>`` in a fresh process with an **empty feature cache** of its own (``HYMTL_CACHE_DIR``),
timed as ``benchmarks/time_to_accuracy.py`` times its rows (whole process, CPU, peak memory),
and its ``test/acc`` read from ``metrics.json`` (val doubles as test in these folders). The
regimes are the shipped ones with their defaults; ``partialN`` is ``mode=partial
mode.trainable_stages=N``. ``auto`` also reports the depth it stopped at.

``--seeds`` runs each row once per training seed (``seed=N``: initialisation, augmentation and
order; the folders' train/val split is fixed). Several of the gaps between regimes are two or
three validation images, so the summary compares the **mean over the seeds** each (folder,
regime) has, and gives their range.

The summary gives, per folder, the best fixed regime and how far ``auto`` is from it. The load
average (1 min) is printed before and after every row and kept in the table: run it alone.
``<out>/results.json`` and ``<out>/results.md`` are rewritten after every row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGIMES = {
    "frozen": ["mode=frozen"],
    "partial1": ["mode=partial"],
    "partial2": ["mode=partial", "mode.trainable_stages=2"],
    "partial3": ["mode=partial", "mode.trainable_stages=3"],
    "finetune": ["mode=finetune"],
    "two_phase": ["mode=two_phase"],
    "auto": ["mode=auto"],
    # the first measurement of mode=auto, before step 0 got head_epochs (20): 6 epochs for the head too
    "auto_head6": ["mode=auto", "mode.depth_search.head_epochs=6"],
    # patience 1: the search looks one stage past the first step that did not pay (measured, not shipped)
    "auto_p1": ["mode=auto", "mode.depth_search.patience=1"],
    # mode=auto before its steps got 12 epochs: 6 per step below the head (digits: 2.3 points under partial2)
    "auto_steps6": ["mode=auto", "mode.depth_search.step_epochs=6", "mode.epochs=40"],
}


def _measured():
    """``measured`` of benchmarks/time_to_accuracy.py: one way to time a process."""
    spec = importlib.util.spec_from_file_location("time_to_accuracy", Path(__file__).with_name("time_to_accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measured


def run_row(measured, folder: Path, regime: str, seed: int, extra: list[str], out: Path) -> dict:
    # seed 0 (the shipped one) keeps the names and the command of the rows measured before --seeds
    name = f"{folder.name}-{regime}" + (f"-s{seed}" if seed else "")
    run_dir = out / "runs" / name
    overrides = [*REGIMES[regime], "model=efficientnet_lite0", "data=folder", f"data.root={folder}",
                 *([f"seed={seed}"] if seed else []), *extra]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="depth-cache-") as cache:
        env = {**os.environ, "HYMTL_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "hymtl.train", *overrides, f"hydra.run.dir={run_dir}"]
        row = {"folder": folder.name, "regime": regime, "seed": seed,
               "command": "python -m hymtl.train " + " ".join(shlex.quote(o) for o in overrides),
               **measured(cmd, out / "runs" / f"{name}.log", env)}
    row.update(load_before=load_before, load_after=os.getloadavg()[0])
    metrics = run_dir / "metrics.json"
    if row["returncode"] != 0 or not metrics.is_file():
        row["error"] = (out / "runs" / f"{name}.log").read_text()[-1500:]
        return row
    m = json.loads(metrics.read_text())
    row.update(test_acc=m.get("test/acc"), epochs=m.get("epochs"))
    steps = m.get("depth_search", {}).get("steps") if isinstance(m.get("depth_search"), dict) else None
    if steps:
        row["depth"] = m["depth_search"].get("chosen_stages")
        row["steps"] = len(steps)
    return row


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _seed(row: dict) -> int:
    return row.get("seed", 0)


def markdown(rows: list[dict], note: str) -> str:
    lines = [f"Machine: {os.cpu_count()} CPUs. {note}".strip(), "",
             "| folder | regime | seed | test acc | process s | CPU s | peak GB | load before/after | note |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        extra = r.get("error", "").strip().splitlines()[-1:] if r.get("error") else []
        if r.get("depth") is not None:
            extra = [f"chose top {r['depth']} stage(s) in {r['steps']} step(s)"]
        lines.append(f"| {r['folder']} | {r['regime']} | {_seed(r)} | {fmt(r.get('test_acc'))} | {fmt(r.get('process_s'), '.1f')} "
                     f"| {fmt(r.get('cpu_s'), '.1f')} | {fmt(r.get('peak_rss_gb'), '.2f')} "
                     f"| {r['load_before']:.2f}/{r['load_after']:.2f} | {' '.join(extra)} |")
    # per (folder, regime): the mean over its seeds
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("test_acc") is not None:
            groups.setdefault((r["folder"], r["regime"]), []).append(r)
    summary = {key: {"acc": statistics.mean(r["test_acc"] for r in group),
                     "s": statistics.mean(r["process_s"] for r in group),
                     "low": min(r["test_acc"] for r in group), "high": max(r["test_acc"] for r in group),
                     "n": len(group)} for key, group in groups.items()}
    lines += ["", "| folder | regime | seeds | mean test acc | range | mean process s |", "|---|---|---:|---:|---|---:|"]
    for (folder, regime), m in summary.items():
        lines.append(f"| {folder} | {regime} | {m['n']} | {m['acc']:.3f} | {m['low']:.3f}-{m['high']:.3f} | {m['s']:.1f} |")
    lines += ["", "| folder | best fixed regime (mean) | its acc | auto acc | auto - best | auto s | best's s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for folder in dict.fromkeys(r["folder"] for r in rows):
        fixed = [(regime, m) for (f, regime), m in summary.items() if f == folder and not regime.startswith("auto")]
        auto = summary.get((folder, "auto"))
        if not fixed:
            continue
        best_regime, best = max(fixed, key=lambda item: (item[1]["acc"], -item[1]["s"]))
        diff = None if auto is None else auto["acc"] - best["acc"]
        auto_acc = "-" if auto is None else f"{auto['acc']:.3f} ({auto['n']} seeds)"
        lines.append(f"| {folder} | {best_regime} ({best['n']} seeds) | {best['acc']:.3f} | {auto_acc} "
                     f"| {fmt(diff, '+.3f')} | {fmt(auto['s'] if auto else None, '.1f')} | {best['s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "hymtl-depth")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds: one row each")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    measured = _measured()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    rows: list[dict] = json.loads(results.read_text()) if results.is_file() else []
    done = {(r["folder"], r["regime"], _seed(r)) for r in rows if r.get("test_acc") is not None}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for folder in args.folders:
        for regime in args.regimes:
            for seed in args.seeds:
                if (folder.name, regime, seed) in done:
                    continue
                row = run_row(measured, folder.resolve(), regime, seed, args.extra, args.out)
                rows = [r for r in rows if (r["folder"], r["regime"], _seed(r)) != (folder.name, regime, seed)] + [row]
                results.write_text(json.dumps(rows, indent=1))
                (args.out / "results.md").write_text(markdown(rows, args.note))
                print(f"{row['folder']:>14} {regime:>10} seed {seed} acc {fmt(row.get('test_acc'))} "
                      f"{row['process_s']:7.1f} s load {row['load_before']:.2f}->{row['load_after']:.2f}"
                      + (f" ERROR {row['error'].strip().splitlines()[-1]}" if row.get("error") else ""), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(markdown(rows, args.note))


if __name__ == "__main__":
    main()

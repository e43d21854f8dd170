"""One table over the runs of a sweep: what ``python -m hymtl.summarize DIR`` runs, and the
end of every multirun.

For each run folder below ``DIR`` (a folder with ``.hydra/overrides.yaml``) :func:`summarize`
reads ``metrics.json`` — or ``error.json`` for a run that failed — and writes ``summary.csv``
(one row per run) and ``summary.md`` (the runs, then the mean ± sample standard deviation over
each group of runs whose overrides differ only by ``seed``) into ``DIR``, and returns the
Markdown. :class:`SweepSummary` (a Hydra callback registered in ``conf/hydra/default.yaml``)
does it by itself when a multirun ends, prints it and says where it is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hymtl.errors import HymtlError, first_line
from hymtl.fileio import atomic_write_text

log = logging.getLogger("hymtl.summarize")

def columns_for(metric: str = "acc") -> tuple[tuple[str, str, str], ...]:
    """(column, metrics.json key, format) of the numeric columns, in table order: the task's
    metric (``acc``; ``f1_micro`` for multi-label: ``task.metric``) on test and its best on val."""
    return (
        (f"test_{metric}", f"test/{metric}", "{:.4f}"),
        (f"val_{metric}_best", f"val/{metric}_best", "{:.4f}"),
        ("epochs", "epochs", "{:.0f}"),
        ("wall_time_s", "wall_time_s", "{:.1f}"),
        ("examples_per_sec", "examples_per_sec", "{:.1f}"),
    )


#: the columns of a multi-class sweep
COLUMNS = columns_for()
#: overrides that repeat one configuration rather than change it: runs that differ only by these
#: share a group (mean ± std): seeds, and the folds of a k-fold sweep (data.folds=K data.fold=0,…)
SEED_KEYS = ("seed", "data.fold")


class SummaryError(HymtlError):
    """No runs to summarise."""


@dataclass
class Run:
    """One run folder: its overrides and final numbers (or the error that ended it)."""

    name: str
    overrides: list[str]
    values: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    #: where each logger put the run (``metrics.json["loggers"]``; empty for older runs)
    loggers: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "ok" if self.values else "incomplete"

    def group_overrides(self) -> tuple[str, ...]:
        """The overrides without the seed: runs that differ only by seed share a group."""
        return tuple(o for o in self.overrides if _override_key(o) not in SEED_KEYS)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _run_sort_key(path: Path, root: Path) -> tuple:
    # numbered multirun folders (0, 1, …, 10) in numeric order
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.relative_to(root).parts)


def _is_training_run(folder: Path) -> bool:
    """False for the folders of ``hymtl.eval`` (``<run>/eval/<stamp>/``), which have a ``.hydra/`` too."""
    config = folder / ".hydra" / "config.yaml"
    try:
        task = (yaml.safe_load(config.read_text()) or {}).get("task_name") if config.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        task = None
    return task != "eval"


def collect_runs(root: str | Path) -> list[Run]:
    """Every training run folder below ``root`` (``root`` itself included), in job order."""
    root = Path(root)
    if not root.is_dir():
        raise SummaryError(f"not a folder: {root}")
    folders = sorted((p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")
                      if _is_training_run(p.parent.parent)),
                     key=lambda p: _run_sort_key(p, root))
    runs = []
    for folder in folders:
        name = folder.relative_to(root).as_posix() if folder != root else "."
        try:
            overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, yaml.YAMLError) as exc:
            log.warning("skipping %s: unreadable overrides.yaml (%s)", folder, first_line(exc))
            continue
        run = Run(name=name, overrides=[str(o) for o in overrides])
        metrics_file, error_file = folder / "metrics.json", folder / "error.json"
        if error_file.is_file():
            try:
                run.error = str(json.loads(error_file.read_text()).get("error", "unknown error"))
            except (OSError, ValueError):
                run.error = "unreadable error.json"
        elif metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, ValueError):
                run.error = "unreadable metrics.json"
            else:
                run.metrics = metrics if isinstance(metrics, dict) else {}
                places = metrics.get("loggers") if isinstance(metrics, dict) else None
                run.loggers = places if isinstance(places, dict) else {}
        runs.append(run)
    if not runs:
        raise SummaryError(f"no runs below {root} (looked for */.hydra/overrides.yaml)")
    columns = sweep_columns(runs)
    for run in runs:
        if run.metrics:
            run.values = {column: _number(run.metrics.get(key)) for column, key, _ in columns}
    return runs


def sweep_columns(runs: Sequence[Run]) -> tuple[tuple[str, str, str], ...]:
    """The columns of a sweep: those of its runs' task metric (the first run that names one)."""
    for run in runs:
        task = run.metrics.get("task") if run.metrics else None
        if isinstance(task, dict) and isinstance(task.get("metric"), str) and task["metric"].isidentifier():
            return columns_for(task["metric"])
    return COLUMNS


def varying_overrides(runs: Sequence[Run]) -> tuple[list[str], dict[str, list[str]]]:
    """Split overrides into those every run shares and, per run, those that vary."""
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)]
    return common, {r.name: [o for o in r.overrides if o not in common] for r in runs}


def _fmt(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


@dataclass
class Group:
    """Runs whose overrides differ only by seed, with the mean and sample std of each column."""

    overrides: list[str]
    runs: list[Run]

    def stats(self, column: str) -> tuple[float, float | None, int] | None:
        values = [r.values[column] for r in self.runs if r.status == "ok" and r.values.get(column) is not None]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    common = set(varying_overrides(runs)[0])
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = run.group_overrides()
        shown = [o for o in key if o not in common]
        groups.setdefault(key, Group(shown, [])).runs.append(run)
    return list(groups.values())


def summary_rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    """The per-run table: run, the overrides that vary between runs, status, numbers."""
    _, varying = varying_overrides(runs)
    rows = []
    for run in runs:
        row = {"run": run.name, "overrides": " ".join(varying[run.name]), "status": run.status}
        row.update({column: _fmt(run.values.get(column), pattern) for column, _, pattern in sweep_columns(runs)})
        row["error"] = run.error or ""
        rows.append(row)
    return rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def render_markdown(runs: Sequence[Run], title: str = "Sweep summary") -> str:
    common, _ = varying_overrides(runs)
    rows = summary_rows(runs)
    numeric = sweep_columns(runs)
    columns = ["run", "overrides", "status", *(c for c, _, _ in numeric)]
    failed = [r for r in rows if r["status"] == "failed"]
    parts = [f"# {title}", ""]
    if common:
        parts += ["Common overrides: `" + " ".join(common) + "`", ""]
    ok = sum(r["status"] == "ok" for r in rows)
    parts += [f"{len(rows)} runs: {ok} ok, {len(failed)} failed, {len(rows) - ok - len(failed)} incomplete.", ""]
    parts += [_markdown_table(columns, [[r[c] for c in columns] for r in rows]), ""]
    if failed:
        parts += ["Failed runs:", ""] + [f"- run {r['run']}: {r['error']}" for r in failed] + [""]
    groups = group_runs(runs)
    header = ["overrides (all seeds and folds)", "runs ok", *(f"{c} mean ± std" for c, _, _ in numeric)]
    body = []
    for group in groups:
        cells = [" ".join(group.overrides) or "(none)",
                 f"{sum(r.status == 'ok' for r in group.runs)}/{len(group.runs)}"]
        for column, _, pattern in numeric:
            stats = group.stats(column)
            if stats is None:
                cells.append("")
            else:
                mean, std, _n = stats
                cells.append(_fmt(mean, pattern) + ("" if std is None else " ± " + _fmt(std, pattern)))
        body.append(cells)
    parts += ["Mean ± sample standard deviation over seeds and folds:", "", _markdown_table(header, body), ""]
    return "\n".join(parts)


def render_csv(runs: Sequence[Run]) -> str:
    rows = summary_rows(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summarize(root: str | Path, write: bool = True) -> str:
    """Summarise the runs below ``root``; write ``summary.csv``/``summary.md`` there; return the Markdown."""
    root = Path(root)
    runs = collect_runs(root)
    markdown = render_markdown(runs, title=f"Sweep summary: {root}")
    if write:
        atomic_write_text(root / "summary.csv", render_csv(runs))
        atomic_write_text(root / "summary.md", markdown)
    return markdown


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write its summary, print the table and say where
    it is (:func:`sweep_end_lines`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            markdown = summarize(sweep_dir)
        except HymtlError as exc:
            log.warning("no sweep summary: %s", first_line(exc))
        else:
            print(markdown, flush=True)
            print("\n".join(sweep_end_lines(sweep_dir, collect_runs(sweep_dir))), flush=True)
        exit_if_jobs_failed(sweep_dir)


def exit_if_jobs_failed(sweep_dir: Path) -> None:
    """Every job has run: a sweep with a failed job exits 1 (a script or CI must not read success),
    with one line. Failures are those of this process's jobs (:func:`hymtl.cli.failed_jobs`) or
    the ``error.json`` of any job folder (launchers that run jobs in other processes)."""
    from hymtl.cli import failed_jobs

    failed = max(len(failed_jobs()), sum(1 for _ in sweep_dir.glob("*/error.json")))
    if failed:
        print(f"error: {failed} job{'s' if failed != 1 else ''} of the sweep failed (see the log above and "
              f"{sweep_dir / 'summary.md'})", file=sys.stderr, flush=True)
        sys.exit(1)


def sweep_end_lines(sweep_dir: str | Path, runs: Sequence[Run] | None = None) -> list[str]:
    """The end of a multirun's output, after its table: where the summary is, then per logger
    kind the runs' records (``metrics.json["loggers"]``, :func:`hymtl.loggers.sweep_lines`): the
    command that opens every run side by side in TensorBoard, the MLflow experiment, the W&B
    offline folders to sync. Runs without a record (older ones, failed ones) count as TensorBoard's
    when no run has one."""
    from hymtl.fileio import shown_path
    from hymtl.loggers import sweep_lines

    sweep_dir = Path(sweep_dir)
    places = [r.loggers for r in runs or [] if r.loggers]
    lines = sweep_lines(places or [{"tensorboard": {}}], str(sweep_dir))
    return [f"sweep summary: {shown_path(sweep_dir / 'summary.md')} (table above; also {(sweep_dir / 'summary.csv').name})",
            *lines]

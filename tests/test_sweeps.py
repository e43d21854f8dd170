"""Hydra multiruns: one folder per run, failures recorded without losing the others, the
sweep summary (end-of-multirun callback and ``python -m hymtl.summarize``), sweep configs."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from hymtl import summaries, summarize
from test_train import TINY_MODEL, run_train


def _fake_run(folder: Path, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.json").write_text(json.dumps({"error": error}))


def test_summary_groups_seeds_and_matches_hand_computed_mean_and_std(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    values = {  # (mode, seed) -> test acc, best val acc, epochs, wall s, ex/s
        ("frozen", 0): (0.90, 0.92, 10, 60.0, 40.0),
        ("frozen", 1): (0.94, 0.95, 10, 62.0, 38.0),
        ("frozen", 2): (0.95, 0.96, 10, 61.0, 42.0),
        ("finetune", 0): (0.97, 0.97, 5, 120.0, 12.0),
    }
    for num, ((mode, seed), (test, val, epochs, wall, eps)) in enumerate(values.items()):
        _fake_run(sweep / str(num), ["model=efficientnet_lite0", f"mode={mode}", f"seed={seed}"],
                  {"test/acc": test, "val/acc_best": val, "epochs": epochs, "wall_time_s": wall, "examples_per_sec": eps})
    # job 10 must sort after 9, not after 1
    _fake_run(sweep / "10", ["model=efficientnet_lite0", "mode=finetune", "seed=1"], error="ValueError: boom")
    # an evaluation of run 0 (python -m hymtl.eval) is not a run of the sweep
    _fake_run(sweep / "0" / "eval" / "2026-01-01_00-00-00", ["ckpt_path=x.ckpt"])
    (sweep / "0" / "eval" / "2026-01-01_00-00-00" / ".hydra" / "config.yaml").write_text("task_name: eval\n")

    assert summarize.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    markdown = (sweep / "summary.md").read_text()
    assert printed.strip() == markdown.strip()
    rows = list(csv.DictReader(io.StringIO((sweep / "summary.csv").read_text())))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3", "10"]
    assert rows[0]["overrides"] == "mode=frozen seed=0"  # the common override is not repeated
    assert rows[0]["test_acc"] == "0.9000" and rows[3]["epochs"] == "5"
    assert rows[4]["status"] == "failed" and rows[4]["error"] == "ValueError: boom" and rows[4]["test_acc"] == ""
    assert "Common overrides: `model=efficientnet_lite0`" in markdown
    assert "- run 10: ValueError: boom" in markdown

    frozen = [values[("frozen", s)][0] for s in range(3)]
    mean, std = statistics.fmean(frozen), statistics.stdev(frozen)  # 0.93, 0.026458
    assert f"| mode=frozen | 3/3 | {mean:.4f} ± {std:.4f} |" in markdown
    assert "| mode=frozen | 3/3 | 0.9300 ± 0.0265 |" in markdown
    # one successful seed: a mean without a std; the failed run counts in the group's total
    assert "| mode=finetune | 1/2 | 0.9700 | 0.9700 | 5 | 120.0 | 12.0 |" in markdown


def test_summarize_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no runs below")
    assert summarize.main([str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_multirun_records_a_failing_run_and_summarises_the_others(tiny_folder, tmp_path):
    # model.dropout=2.0 fails inside torch (ValueError, not one of our errors): it must be
    # reported, recorded in its own run folder, and not stop the sweep
    result = run_train("-m", *TINY_MODEL, "mode=frozen", "data=folder", f"data.root={tiny_folder}",
                       "+trainer.fast_dev_run=true", "seed=0,1", "model.dropout=0.0,2.0", cwd=tmp_path, timeout=1800)
    # every job ran, and the sweep says it failed: exit 1 and one line at the very end
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 jobs of the sweep failed")
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    runs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in runs] == ["0", "1", "2", "3"]

    # job order: seed=0 dropout=0.0, seed=0 dropout=2.0, seed=1 dropout=0.0, seed=1 dropout=2.0
    for ok in (runs[0], runs[2]):
        assert (ok / "metrics.json").is_file() and not (ok / "error.json").exists()
    for failed in (runs[1], runs[3]):
        error = json.loads((failed / "error.json").read_text())
        assert error["type"] == "ValueError" and "dropout probability" in error["error"]
        assert "Traceback" in error["traceback"]
    assert "run failed: ValueError: dropout probability" in result.stdout + result.stderr

    # the end-of-multirun callback wrote and printed the summary
    markdown = (sweep / "summary.md").read_text()
    assert "4 runs: 2 ok, 2 failed, 0 incomplete." in markdown
    assert "4 runs: 2 ok, 2 failed" in result.stdout
    # ... and its end says where the summary is and how to compare the runs, after the table
    relative = sweep.relative_to(tmp_path)
    assert result.stdout.rstrip().splitlines()[-2:] == [
        f"sweep summary: {relative}/summary.md (table above; also summary.csv)",
        f"dashboard: tensorboard --logdir {relative}",
    ]
    assert result.stdout.rstrip().endswith(markdown.strip() + "\n\n" + f"sweep summary: {relative}/summary.md "
                                           "(table above; also summary.csv)\n"
                                           f"dashboard: tensorboard --logdir {relative}")
    rows = list(csv.DictReader(io.StringIO((sweep / "summary.csv").read_text())))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    assert [r["overrides"] for r in rows] == ["seed=0 model.dropout=0.0", "seed=0 model.dropout=2.0",
                                              "seed=1 model.dropout=0.0", "seed=1 model.dropout=2.0"]
    accs = [json.loads((runs[i] / "metrics.json").read_text())["test/acc"] for i in (0, 2)]
    assert [float(rows[i]["test_acc"]) for i in (0, 2)] == pytest.approx(accs, abs=5e-5)
    assert f"| model.dropout=0.0 | 2/2 | {statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f} |" in markdown
    assert "| model.dropout=2.0 | 0/2 |" in markdown

    # on demand, the same tables again (the title names the folder as given)
    again = summaries.summarize(sweep, write=False)
    assert again.splitlines()[1:] == markdown.splitlines()[1:]


def test_tutorial_experiment_is_the_tutorial_recipe(compose):
    from hydra.utils import instantiate

    cfg = compose("experiment=tutorial")
    assert cfg.model.backbone == "resnet18" and cfg.mode.name == "finetune"
    assert cfg.mode.epochs == 25 and cfg.data.batch_size == 4
    assert cfg.model.lr == 1e-3 and cfg.model.head_lr_mult == 1.0 and cfg.model.backbone_lr_mult == 1.0
    assert cfg.model.optimizer == {"_target_": "torch.optim.SGD", "momentum": 0.9, "weight_decay": 0.0}
    schedule = instantiate(cfg.model.scheduler)  # StepLR(7, 0.1) as an epoch -> factor function
    assert [schedule(e, 25) for e in (0, 6, 7, 13, 14, 24)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])

    # side by side with the frozen regime and offline weights: the command line still chooses
    cfg = compose("experiment=tutorial", "mode=frozen", "model=efficientnet_lite0")
    assert cfg.mode.name == "frozen" and cfg.model.unfreeze_at_epoch is None
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.mode.epochs == 25 and cfg.model.head_lr_mult == 1.0


def test_optuna_search_config_when_the_sweeper_is_installed(compose):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[optuna]'")
    cfg = compose("hparams_search=optuna")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc_best"  # tune on validation, never on the test split
    assert set(cfg.hydra.sweeper.params) >= {"mode.lr", "mode.head_lr_mult"}

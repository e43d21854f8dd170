"""One run per run folder: launches that start in the same second get ``<time>``, ``<time>_2``…

Two ``hymtl.train`` processes (or two multiruns) started at once, as users start them from two
terminals. "The same second" is made deterministic without touching the clock: both launches
get the same base folder through ``${hymtl_run_dir:…}`` (the resolver ``conf/hydra/default.yaml``
wraps around ``<date>/<time>``), so exactly one gets the base and the other ``<base>_2``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import entry_command, make_image_folder

TINY = ["model=efficientnet_lite0", "model.pretrained=false", "data.num_workers=0", "data.batch_size=4",
        "data=folder", "+trainer.fast_dev_run=true"]
RUNS = {1: "finetune", 2: "frozen"}  # seed -> mode: metrics.json names the mode, the config the seed


def _start(*overrides: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ}
    for var in ("HYMTL_OUTPUT_DIR", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    return subprocess.Popen([*entry_command("hymtl.train"), *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: int = 600) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]


def _check_run(run: Path, seed: int) -> None:
    """Everything in ``run`` belongs to the run launched with ``seed``."""
    assert f"seed={seed}" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == seed
    assert json.loads((run / "metrics.json").read_text())["mode"] == RUNS[seed]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(run.rglob("*-v1.ckpt"))  # no second run's checkpoint beside the first's


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=4)


def _two_at_once(tiny: Path, cwd: Path, *extra: str) -> None:
    one_epoch = [o for o in TINY if "fast_dev_run" not in o] + [  # fast_dev_run writes no checkpoint
        "mode.epochs=1", "mode.precompute_features=false", "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1"]
    _finish([_start(*one_epoch, f"data.root={tiny}", f"seed={seed}", f"mode={mode}", *extra, cwd=cwd)
             for seed, mode in RUNS.items()])


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_two_folders(tiny, tmp_path):
    _two_at_once(tiny, tmp_path, "hydra.run.dir='${hymtl_run_dir:outputs/same-second,${hydra.mode}}'")
    runs = sorted((tmp_path / "outputs").iterdir())
    assert [r.name for r in runs] == ["same-second", "same-second_2"]
    seeds = {OmegaConf.load(r / ".hydra" / "config.yaml").seed: r for r in runs}
    assert sorted(seeds) == [1, 2]
    for seed, run in seeds.items():
        _check_run(run, seed)


@pytest.mark.slow
def test_two_runs_at_once_with_the_default_layout(tiny, tmp_path):
    _two_at_once(tiny, tmp_path)
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(runs) == 2, runs  # outputs/<date>/<time>[ _2]: same second or not, one run each
    seeds = {OmegaConf.load(r / ".hydra" / "config.yaml").seed: r for r in runs}
    assert sorted(seeds) == [1, 2]
    for seed, run in seeds.items():
        _check_run(run, seed)


@pytest.mark.slow
def test_two_multiruns_in_the_same_second_get_two_sweep_folders(tiny, tmp_path):
    sweep = "hydra.sweep.dir='${hymtl_run_dir:outputs/multirun/same-second,${hydra.mode}}'"
    procs = [_start("-m", *TINY, f"data.root={tiny}", f"mode={mode}", "seed=1,2", sweep, cwd=tmp_path)
             for mode in ("finetune", "two_phase")]
    _finish(procs)
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert [s.name for s in sweeps] == ["same-second", "same-second_2"]
    modes = set()
    for folder in sweeps:
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1"]
        sweep_overrides = OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task
        mode = next(o for o in sweep_overrides if o.startswith("mode=")).split("=", 1)[1]
        modes.add(mode)
        for job in ("0", "1"):  # every job of a sweep in its own sweep's folder
            assert OmegaConf.load(folder / job / ".hydra" / "config.yaml").seed == int(job) + 1
            assert f"mode={mode}" in OmegaConf.load(folder / job / ".hydra" / "overrides.yaml")
            assert json.loads((folder / job / "metrics.json").read_text())["mode"] == mode
            assert not list((folder / job).rglob("*-v1.ckpt"))
    assert modes == {"finetune", "two_phase"}


def test_composing_claims_no_folder(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose("seed=3")
    run_dir, sweep_dir = Path(cfg.hydra.run.dir), Path(cfg.hydra.sweep.dir)  # resolved
    assert run_dir.parts[0] == "outputs" and sweep_dir.parts[:2] == ("outputs", "multirun")
    assert not run_dir.name.endswith("_2")
    assert list(tmp_path.iterdir()) == []


def test_claim_takes_the_next_suffix_and_composing_takes_none(tmp_path):
    from hymtl.runs import claim_run_dir

    base = str(tmp_path / "out" / "12-00-00")
    running, composed = "RUN", None  # ${hydra.mode}
    assert claim_run_dir(base, composed) == base and not (tmp_path / "out").exists()
    assert claim_run_dir(base, running) == base
    assert claim_run_dir(base, running) == base + "_2"
    (tmp_path / "out" / "12-00-00_3").write_text("")  # anything at the name takes it
    assert claim_run_dir(base, running) == base + "_4"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["12-00-00", "12-00-00_2", "12-00-00_3",
                                                                  "12-00-00_4"]


def test_ckpt_path_last_finds_a_suffixed_run(tmp_path):
    """``ckpt_path=last`` searches ``outputs/<date>/<time>*/``: a ``<time>_2`` run is a run like any other."""
    from hymtl.runs import resolve_resume

    log_dir = tmp_path / "outputs"
    older, newer = (log_dir / "2026-01-01" / name / "checkpoints" / "last.ckpt" for name in ("10-00-00", "10-00-00_2"))
    for i, ckpt in enumerate((older, newer)):
        ckpt.parent.mkdir(parents=True)
        (ckpt.parent.parent / ".hydra").mkdir()  # a folder Hydra made
        ckpt.write_bytes(b"")
        os.utime(ckpt, (1_000_000 + i, 1_000_000 + i))
    new_run = log_dir / "2026-01-01" / "10-00-00_3"  # the folder the resuming command claimed
    new_run.mkdir()
    resume = resolve_resume("last", new_run, log_dir)
    assert resume.checkpoint == newer and resume.run_dir == newer.parent.parent


def test_a_resumed_run_that_fails_is_marked_failed_in_its_own_folder(compose, tmp_path, monkeypatch):
    """A resume from a new Hydra folder continues in the run folder of its checkpoint
    (:func:`hymtl.runs.continue_run`): a failure after that goes into ``error.json`` there, and
    the new folder, holding no work, goes. An ``error.json`` of an earlier attempt of the run is
    gone as soon as the resume is accepted."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from hymtl import runs
    from hymtl.cli import run_entry
    from hymtl.errors import HymtlError

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "error.json").write_text(json.dumps({"error": "an earlier attempt"}))
    new = Path(runs.claim_run_dir(str(tmp_path / "outputs" / "2026-01-02" / "09-00-00"), "RUN"))
    (new / ".hydra").mkdir()  # what Hydra writes before the task runs
    (new / "train.log").write_text("")
    cfg = compose(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(new)
        cfg.hydra.job.name = "train"
    seen = {}

    def resume_then_fail(cfg):
        resume = runs.resolve_resume(cfg.ckpt_path, Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
        seen["folder"] = runs.continue_run(cfg, resume)
        seen["output_dir"] = cfg.paths.output_dir
        seen["earlier error.json"] = (run / "error.json").exists()
        raise HymtlError("the resumed run failed")

    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(SystemExit) as exited:
            run_entry(resume_then_fail, cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert exited.value.code == 2
    assert seen == {"folder": run.resolve(), "output_dir": str(run.resolve()), "earlier error.json": False}
    assert json.loads((run / "error.json").read_text())["error"] == "the resumed run failed"
    assert not new.exists()  # held nothing but Hydra's record: released, with no error.json of its own

"""Distributed training as users launch it: 2-process CPU DDP (gloo, localhost), as subprocesses.

Subprocesses on purpose: ``strategy=ddp`` re-runs the command line of its process, which inside
pytest would re-run the test session. The callbacks below are test probes, loaded in the
training processes through ``+callbacks.<name>._target_=test_ddp.<Class>`` (``tests/`` on
``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from conftest import REPO_ROOT, SMALL_VIEWS, entry_command

TESTS_DIR = Path(__file__).resolve().parent
# the launch, the run folder, the ranks' sync: plumbing, on 64 px views (a fraction of 224's work)
TINY = ["model=efficientnet_lite0", "model.pretrained=false", "data.num_workers=0", "data=folder", SMALL_VIEWS]
# the agreement test: a balanced slice of the real data (symlinks: 24+24 train, 16+17 val images),
# frozen pretrained backbone (image path), one epoch
REAL = ["model=efficientnet_lite0", "mode=frozen", "mode.epochs=1", "mode.precompute_features=false",
        "data.num_workers=0", "data=folder"]
# tolerance of the 2-process run against the 1-process run (same global batch of 8). Their
# training differs only in which random augmentation each image drew (the ranks' RNG streams),
# so the head's weights differ slightly; evaluation itself is exact (see the eval-only half).
ACC_TOLERANCE = 0.1    # 3 of 33 test images
LOSS_TOLERANCE = 0.05
# how long a hung rank sleeps: a job that waits for it instead of its collective timeout ends
# after this; one that ends before did not wait (however slow the machine's start-up)
HANG_S = 600
# the ranks' collective timeout in the dies/hangs test. It also bounds the rendezvous, where rank 0
# waits for rank 1 to start (its imports, its file scan): 14-30 s apart on a 2-core machine at a
# load of 9-11, where a timeout of 20 s ended the job at the rendezvous instead of at the hung
# collective (a failure that says nothing about the code). Room for a machine ten times slower
# than a quiet one, and still far below HANG_S.
COLLECTIVE_TIMEOUT_S = 90


# --------------------------------------------------------------------------- probes (run in the trainers)
class BackboneDigest(Callback):
    """Writes ``rank<R>_<when>.txt`` with a SHA-256 of the backbone's parameters and buffers:
    ``start`` (on train start: DDP has wrapped the model, the module has set its phase) and
    ``epoch<E>`` after each training epoch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer, pl_module, when: str) -> None:
        from hymtl.features import state_digest

        self.out_dir.mkdir(parents=True, exist_ok=True)
        frozen = "frozen" if pl_module.backbone_frozen else "trainable"
        (self.out_dir / f"rank{trainer.global_rank}_{when}.txt").write_text(f"{state_digest(pl_module.backbone)} {frozen}")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, f"epoch{trainer.current_epoch}")


class DieOnRank(Callback):
    """At its ``at_batch``-th training batch, global rank ``rank`` ends abruptly (``os._exit``)
    or, with ``hang=True``, stops answering (sleeps for ``HANG_S``)."""

    def __init__(self, rank: int = 1, at_batch: int = 1, code: int = 3, hang: bool = False) -> None:
        self.rank, self.at_batch, self.code, self.hang = rank, at_batch, code, hang

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.at_batch:
            if self.hang:
                time.sleep(HANG_S)
            os._exit(self.code)


class FeatureStats(Callback):
    """Writes ``rank<R>.json``: the feature extractor's counters (images computed, cache hits)
    once the training and validation features exist."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        extractor = trainer.datamodule.features.extractor
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(extractor.stats))


# --------------------------------------------------------------------------- helpers
def _env(extra: dict | None = None) -> dict:
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **(extra or {})}
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(var, None)  # a clean launch, whatever ran this test
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(*args: str, cwd: Path, launcher: list[str] | None = None, timeout: int = 1800, env: dict | None = None):
    started = time.perf_counter()
    cmd = [*launcher, "hymtl.train", *args] if launcher else [*entry_command("hymtl.train"), *args]
    env = _env({"HYMTL_CACHE_DIR": str(cwd / "feature-cache"), **(env or {})})  # no shared feature cache
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    result.wall_s = time.perf_counter() - started
    return result


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m"]


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def ok(result) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def digests(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in folder.glob("rank*_*.txt")}


# --------------------------------------------------------------------------- launch context (in-process)
_LAUNCH_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "NODE_RANK")


def test_launch_context_follows_the_environment(monkeypatch):
    from hymtl import distributed as d

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not d.launched_by_torchrun() and not d.relaunched_by_lightning()
    assert d.choose_start_method() == "spawn"  # not inside @hydra.main: never re-run sys.argv
    assert (d.devices_per_node("auto"), d.num_nodes(1), d.rank_suffix(), d.on_rank_zero(".hydra")) == ("auto", 1, "", ".hydra")

    monkeypatch.setenv("LOCAL_RANK", "1")  # a local rank Lightning's subprocess launcher started
    assert d.relaunched_by_lightning() and d.choose_start_method() == "popen"

    # torchrun, 2 nodes x 4 processes, global rank 6
    for var, value in zip(_LAUNCH_VARS, ("6", "1", "2", "4", "8", "1")):
        monkeypatch.setenv(var, value)
    assert d.launched_by_torchrun() and not d.relaunched_by_lightning()
    assert (d.devices_per_node("auto"), d.num_nodes(1), d.launch_rank()) == (4, 2, 6)
    assert (d.rank_suffix(), d.on_rank_zero(".hydra")) == ("_rank6", None)
    assert d.rank_failure_message(RuntimeError("gloo: connection reset")) is None  # no process group here


@pytest.mark.parametrize("mode, find_unused", [("two_phase", True), ("auto", True), ("finetune", False),
                                               ("frozen", False)])
def test_ddp_config_builds_lightnings_ddp_strategy(compose, monkeypatch, mode, find_unused):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = compose("trainer=ddp_cpu", f"mode={mode}", "trainer.strategy.timeout_s=42")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("cpu", 2, 1)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    # asked of the module when DDP wraps it: the regime's one answer
    assert strategy.ask_module_for_unused_parameters
    module = instantiate(cfg.model, backbone="efficientnet_lite0", pretrained=False, num_classes=2)
    assert module.has_phase_switch is find_unused
    assert strategy._timeout.total_seconds() == 42 and strategy.process_group_backend == "gloo"
    assert strategy._start_method == "spawn"  # composed, not launched from the command line


# --------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_phase_ddp_keeps_ranks_in_sync_one_run_dir_and_resumes(tiny_folder, tmp_path):
    probe = tmp_path / "digests"
    common = [*TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp_cpu", "trainer.devices=2",
              "mode=two_phase", "mode.freeze_epochs=1", "+callbacks.digest._target_=test_ddp.BackboneDigest",
              f"+callbacks.digest.out_dir={probe}"]
    result = train(*common, "mode.epochs=2", cwd=tmp_path)
    ok(result)
    run = only_run_dir(tmp_path / "outputs")
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == [run.name]  # one config copy, rank 0's
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["device"] == "2x cpu" and metrics["epochs"] == 2

    seen = digests(probe)
    for when in ("start", "epoch0", "epoch1"):
        assert seen[f"rank0_{when}"] == seen[f"rank1_{when}"], when  # identical backbones on both ranks
    assert seen["rank0_start"].endswith("frozen") and seen["rank0_epoch1"].endswith("trainable")
    assert seen["rank0_epoch0"] == seen["rank0_start"]  # frozen phase: the backbone did not move
    assert seen["rank0_epoch1"].split()[0] != seen["rank0_epoch0"].split()[0]  # after the switch it trained

    # resume the DDP run from its last checkpoint for one more epoch (it writes to its run folder)
    last = run / "checkpoints" / "last.ckpt"
    resumed = train(*common, "mode.epochs=3", f"ckpt_path={last}", "hydra.run.dir=resumed", cwd=tmp_path)
    ok(resumed)
    seen = digests(probe)
    assert seen["rank0_epoch2"] == seen["rank1_epoch2"] and seen["rank0_epoch2"].endswith("trainable")
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_auto_under_ddp_steps_deeper_on_every_rank_alike(tiny_folder, tmp_path):
    """mode=auto with two ranks: the ranks take rank 0's clock and the synced val metric, so they
    decide the same steps; the backbones stay identical across ranks after every epoch, and the
    stages that join mid-fit are synced by DDP (find_unused_parameters asked of the module)."""
    probe = tmp_path / "digests"
    result = train(*TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp_cpu", "trainer.devices=2",
                   "mode=auto", "mode.trainable_stages=2", "mode.depth_search.step_epochs=1",
                   "mode.depth_search.head_epochs=1",
                   "mode.depth_search.margin=-1", "callbacks.test_figures=null",
                   "+callbacks.digest._target_=test_ddp.BackboneDigest", f"+callbacks.digest.out_dir={probe}",
                   cwd=tmp_path)
    ok(result)
    metrics = json.loads((only_run_dir(tmp_path / "outputs") / "metrics.json").read_text())
    assert [s["stages"] for s in metrics["depth_search"]["steps"]] == [0, 1, 2] and metrics["epochs"] == 3
    seen = digests(probe)
    for epoch in range(3):
        assert seen[f"rank0_epoch{epoch}"] == seen[f"rank1_epoch{epoch}"], epoch
    assert seen["rank0_epoch0"].split()[0] == seen["rank0_start"].split()[0]  # step 0: the head alone
    assert seen["rank0_epoch1"].split()[0] != seen["rank0_epoch0"].split()[0]  # step 1: the top stage trained


# torchrun's ranks share one run folder: with the default folder name across two nodes (below),
# and on one node with two processes here, where the folder is also taken
@pytest.mark.slow
def test_torchrun_ranks_share_the_folder_rank_zero_claimed(tiny_folder, tmp_path):
    """The launch's folder is taken (a run in the same second): rank 0 claims ``<folder>_2`` and
    every rank uses rank 0's name, instead of each rank claiming a folder of its own."""
    (tmp_path / "outputs" / "taken").mkdir(parents=True)
    result = train(*TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp", "+trainer.fast_dev_run=true",
                   "hydra.run.dir='${hymtl_run_dir:outputs/taken,${hydra.mode}}'",
                   cwd=tmp_path, launcher=torchrun("--nproc_per_node", "2", "--master_port", str(_free_port())))
    ok(result)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["taken", "taken_2"]
    run = tmp_path / "outputs" / "taken_2"
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == [run.name]  # one config copy, rank 0's
    assert json.loads((run / "metrics.json").read_text())["device"] == "2x cpu"


@pytest.mark.slow
def test_two_nodes_simulated_on_localhost_share_one_run_dir(tiny_folder, tmp_path):
    """Two torchrun agents (``--nnodes 2``, c10d rendezvous): the run folder's time stamp is node 0's."""
    port = _free_port()
    args = [*TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp", "+trainer.fast_dev_run=true"]
    procs = []
    for node in (0, 1):
        if node == 1:
            time.sleep(2)  # node 1 starts later: its own clock would name a different folder
        launcher = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t")
        procs.append(subprocess.Popen([*launcher, "hymtl.train", *args], cwd=tmp_path,
                                      env=_env({"HYMTL_CACHE_DIR": str(tmp_path / "feature-cache")}),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run = only_run_dir(tmp_path / "outputs")
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == [run.name]  # one config copy, node 0's
    assert json.loads((run / "metrics.json").read_text())["device"] == "2x cpu"


@pytest.mark.slow
def test_frozen_features_are_extracted_once_across_ranks(tiny_folder, tmp_path):
    """mode=frozen trains the head on cached backbone features: each rank runs the backbone over
    its own share of the images and the shares are gathered, so each image is computed once."""
    probe = tmp_path / "stats"
    result = train(*TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp_cpu", "trainer.devices=2",
                   "mode=frozen", "mode.epochs=1", "+callbacks.stats._target_=test_ddp.FeatureStats",
                   f"+callbacks.stats.out_dir={probe}", cwd=tmp_path)
    ok(result)
    stats = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    images = len(list(tiny_folder.rglob("*.jpg")))  # 12 train + 12 val
    assert [s["computed"] for s in stats] == [images // 2, images // 2], stats
    assert json.loads((only_run_dir(tmp_path / "outputs") / "metrics.json").read_text())["device"] == "2x cpu"


@pytest.mark.slow
def test_multirun_with_ddp_spawns_and_makes_one_sweep_folder(tiny_folder, tmp_path):
    result = train("-m", *TINY, f"data.root={tiny_folder}", "data.batch_size=3", "trainer=ddp_cpu",
                   "trainer.devices=2", "+trainer.fast_dev_run=true", "test=false", "seed=0,1", cwd=tmp_path)
    ok(result)
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # strategy=ddp's re-launch of `-m …` would have made a second one
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):  # the second job ran too: no launcher state leaked from the first
        assert json.loads((sweeps[0] / job / "metrics.json").read_text())["device"] == "2x cpu"


@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_job_with_a_message(tiny_folder, tmp_path, hang):
    result = train(*TINY, f"data.root={tiny_folder}", "data.batch_size=2", "trainer=ddp_cpu", "trainer.devices=2",
                   "mode=finetune", "mode.epochs=1", f"trainer.strategy.timeout_s={COLLECTIVE_TIMEOUT_S}",
                   "+callbacks.die._target_=test_ddp.DieOnRank", f"+callbacks.die.hang={hang}", cwd=tmp_path,
                   timeout=2 * HANG_S)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    # ours (rank 0 saw the collective fail) or Lightning's (its observer saw rank 1 exit first)
    assert "lost the other DDP ranks" in last or "terminated with code 3" in output, output[-3000:]
    assert result.wall_s < HANG_S  # ended by the collective's timeout, not by the hung rank waking up


def real_slice(real_data: Path, dest: Path, train_per_class: int = 24, val_per_class=(16, 17)) -> Path:
    """Symlinks to the first images of each class (sorted names): a small, balanced copy."""
    for split, counts in (("train", (train_per_class, train_per_class)), ("val", val_per_class)):
        for name, count in zip(("ants", "bees"), counts):
            (dest / split / name).mkdir(parents=True)
            for f in sorted((real_data / split / name).iterdir())[:count]:
                (dest / split / name / f.name).symlink_to(f)
    return dest


@pytest.mark.slow
@pytest.mark.realdata
def test_two_process_ddp_metrics_match_one_process(real_data, tmp_path):
    data = REAL + [f"data.root={real_slice(real_data, tmp_path / 'slice')}"]
    # evaluation alone (no training step): the synced 2-process numbers equal the 1-process ones,
    # also for an odd number of test images (33: no sample is counted twice)
    no_training = "+trainer.limit_train_batches=0"
    single = train(*data, no_training, "data.batch_size=8", "hydra.run.dir=eval1", cwd=tmp_path)
    double = train(*data, no_training, "data.batch_size=4", "trainer=ddp_cpu", "trainer.devices=2",
                   "hydra.run.dir=eval2", cwd=tmp_path)
    ok(single), ok(double)
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("eval1", "eval2"))
    assert m1["test/acc"] == pytest.approx(m2["test/acc"], abs=1e-6)
    assert m1["test/loss"] == pytest.approx(m2["test/loss"], rel=1e-4)

    # one epoch, same global batch (8 = 1 x 8 = 2 x 4)
    single = train(*data, "data.batch_size=8", "hydra.run.dir=one", cwd=tmp_path)
    double = train(*data, "data.batch_size=4", "trainer=ddp_cpu", "trainer.devices=2", "hydra.run.dir=two", cwd=tmp_path)
    ok(single), ok(double)
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    print(f"1 process: {single.wall_s:.1f}s test/acc {m1['test/acc']:.4f} loss {m1['test/loss']:.4f}; "
          f"2 processes: {double.wall_s:.1f}s test/acc {m2['test/acc']:.4f} loss {m2['test/loss']:.4f}")
    assert m2["device"] == "2x cpu" and m1["device"] == "cpu"
    assert abs(m1["test/acc"] - m2["test/acc"]) <= ACC_TOLERANCE
    assert abs(m1["test/loss"] - m2["test/loss"]) <= LOSS_TOLERANCE
    assert min(m1["test/acc"], m2["test/acc"]) > 0.7  # both learned: agreement is not two runs at chance


@pytest.mark.slow
def test_ranks_starting_at_once_download_the_data_once(tmp_path):
    """torchrun starts every rank at once and each calls prepare_data before the Trainer exists.

    The processes start prepare_data together (a file barrier) and the server takes a second to
    answer, so without the lock each of them would see no folder and download it."""
    import http.server
    import threading
    import zipfile

    from conftest import make_image_folder

    src = make_image_folder(tmp_path / "src", per_class=1)
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "d.zip", "w") as z:
        for f in sorted(src.rglob("*.jpg")):
            z.write(f, f"d/{f.relative_to(src)}")

    class SlowHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self):
            time.sleep(1.0)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/d.zip"
    root, ready = tmp_path / "data" / "d", tmp_path / "ready"
    ready.mkdir()
    script = ("import logging, sys, time, pathlib; logging.basicConfig(level=logging.INFO);"
              "from hymtl.data import ImageFolderDataModule;"
              "ready = pathlib.Path(sys.argv[3]); (ready / sys.argv[4]).touch();"
              "[time.sleep(0.05) for _ in iter(lambda: len(list(ready.iterdir())) < 3, False)];"
              "ImageFolderDataModule(root=sys.argv[1], download_url=sys.argv[2]).prepare_data()")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(root), url, str(ready), str(i)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        server.shutdown()
        server.server_close()
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("downloading" in out for out in outputs) == 1, outputs
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    assert [p.name for p in root.parent.iterdir()] == ["d"]  # no lock or temporary files left

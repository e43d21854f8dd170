"""Loggers and early stopping, checked with the real things: a ``mlflow server`` (SQLite backend,
127.0.0.1, a free port, started and stopped here) read back through ``MlflowClient``; MLflow's
local store with no server; W&B's offline run folder read back record by record; Lightning's
CSV file; early stopping in two_phase and across a resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import entry_command, make_image_folder
from test_train import TINY_MODEL, run_train



def _needs(package: str) -> None:
    """Skip without ``package`` (``pip install 'hymtl[<package>]'``); under CI (``CI`` set,
    ``scripts/setup.sh`` installs both) a missing package fails instead."""
    try:
        __import__(package)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{package} is missing (scripts/setup.sh installs hymtl[{package}])")
        pytest.skip(f"pip install 'hymtl[{package}]'")

FROZEN = [*TINY_MODEL, "mode=frozen", "data=folder"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` with an SQLite backend on 127.0.0.1 and a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("ab"), start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode}: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("mlflow server did not answer within 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its uvicorn workers too
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    _needs("mlflow")
    root = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(root)
    try:
        yield server
    finally:
        server.stop()


def _env(base: Path, **extra: str) -> dict:
    """No tracker credentials or settings from the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update({"HYMTL_CACHE_DIR": str(base / "cache"), "HOME": str(base / "home"), **extra})
    return env


def _run(base: Path, *overrides: str, env: dict | None = None, epochs: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    images = base / "images"
    if not images.exists():
        make_image_folder(images, per_class=4)
    run = base / "outputs" / "run"
    result = subprocess.run([*entry_command("hymtl.train"), *FROZEN, f"data.root={images}", f"mode.epochs={epochs}",
                             f"hydra.run.dir={run}", *overrides],
                            cwd=base, capture_output=True, text=True, timeout=600, env=env or _env(base))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result, run


# --------------------------------------------------------------------------- MLflow
@pytest.mark.slow
def test_mlflow_server_gets_params_metrics_figures_and_test_metrics_and_csv_every_epoch(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    result, run = _run(tmp_path, "logger=[tensorboard,mlflow,csv]", "mode.lr=0.02",
                       env=_env(tmp_path, MLFLOW_TRACKING_URI=mlflow_server.url))
    metrics = json.loads((run / "metrics.json").read_text())
    place = metrics["loggers"]["mlflow"]
    assert place["tracking_uri"] == mlflow_server.url and "not_sent" not in place

    client = MlflowClient(mlflow_server.url)
    mlrun = client.get_run(place["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.experiment_id == place["experiment_id"]
    experiment = client.get_experiment(place["experiment_id"])
    assert experiment.name == "hymtl" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the HParams dashboard's columns (curated + command line), and the full config beside them
    params = mlrun.data.params
    assert params["mode"] == "frozen" and params["model.backbone"] == "efficientnet_lite0"
    assert params["mode.lr"] == "0.02" and params["data.batch_size"] == "4" and params["seed"] == "0"
    assert params["mode/name"] == "frozen"
    # per-epoch metrics, the test metrics, hp_metric and the run's facts
    for key in ("train/loss", "val/acc", "val/acc_best"):
        assert len(client.get_metric_history(place["run_id"], key)) == 2, key
    assert mlrun.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert mlrun.data.metrics["hp_metric"] == pytest.approx(metrics["test/acc"])
    assert mlrun.data.metrics["epochs"] == 2 and mlrun.data.metrics["wall_time_s"] > 0
    assert mlrun.data.tags["hymtl.best_checkpoint"] == metrics["best_checkpoint"]
    assert mlrun.data.tags["hymtl.run_dir"] == str(run.resolve())
    # the test figures, as PNG artifacts
    figures = {Path(a.path).name for a in client.list_artifacts(place["run_id"], "figures")}
    assert figures == {"confusion_matrix.png", "predictions.png", "most_wrong.png"}
    png = Path(client.download_artifacts(place["run_id"], "figures/confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # the end lines: TensorBoard's command, MLflow's page with experiment and run id, the CSV file
    lines = result.stdout.strip().splitlines()
    assert lines[-3] == "dashboard: tensorboard --logdir outputs/run"
    assert lines[-2] == (f"mlflow: experiment hymtl (id {place['experiment_id']}), run {place['run_id']}: "
                         f"{mlflow_server.url}/#/experiments/{place['experiment_id']}/runs/{place['run_id']}")
    assert lines[-1] == "csv: outputs/run/csv/metrics.csv"

    # CSV: parses, every epoch's numbers
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    for key in ("train/loss", "val/acc"):
        assert sorted(int(r["epoch"]) for r in rows if r.get(key)) == [0, 1], key
    assert [float(r["test/acc"]) for r in rows if r.get("test/acc")] == [pytest.approx(metrics["test/acc"])]

    if os.environ.get("HYMTL_SCREENSHOT_DIR"):  # the page of the run, for a person to look at
        _screenshot(mlflow_server.url, place, Path(os.environ["HYMTL_SCREENSHOT_DIR"]), tmp_path)


def _screenshot(url: str, place: dict, folder: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    page = f"{url}/#/experiments/{place['experiment_id']}/runs/{place['run_id']}"
    for name, address in (("mlflow_run.png", page), ("mlflow_metrics.png", page + "/model-metrics")):
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                        f"--user-data-dir={tmp_path / name}", "--virtual-time-budget=30000",
                        f"--screenshot={folder / name}", address], capture_output=True, timeout=180)


@pytest.mark.slow
def test_mlflow_without_a_server_writes_the_local_store_under_outputs(tmp_path):
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    result, run = _run(tmp_path, "logger=mlflow", epochs=1)
    store = tmp_path / "outputs" / "mlruns" / "mlflow.db"
    assert store.is_file()
    place = json.loads((run / "metrics.json").read_text())["loggers"]["mlflow"]
    assert place["tracking_uri"] == f"sqlite:///{store}"
    mlrun = MlflowClient(place["tracking_uri"]).get_run(place["run_id"])
    assert mlrun.data.params["mode"] == "frozen" and "test/acc" in mlrun.data.metrics
    assert result.stdout.strip().splitlines()[-1].endswith(
        "mlflow ui --backend-store-uri sqlite:///outputs/mlruns/mlflow.db")
    figures = {Path(a.path).name for a in MlflowClient(place["tracking_uri"]).list_artifacts(place["run_id"], "figures")}
    assert figures == {"confusion_matrix.png", "predictions.png", "most_wrong.png"}


@pytest.mark.slow
def test_mlflow_server_not_answering_at_the_start_costs_one_warning_not_the_run(tmp_path):
    _needs("mlflow")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result, run = _run(tmp_path, "logger=[mlflow,csv]", epochs=1, env=_env(tmp_path, MLFLOW_TRACKING_URI=dead))
    warnings = [l for l in result.stdout.splitlines() + result.stderr.splitlines() if "mlflow: the tracking server" in l]
    assert len(warnings) == 1 and "did not answer at the start" in warnings[0], warnings
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/acc" in metrics and (run / "figures" / "predictions.png").is_file()
    # what MLflow would have got is in the run folder, and the end says what was not sent
    rows = list(csv.DictReader((run / "mlflow_unsent" / "metrics.csv").open()))
    assert any(r.get("val/acc") for r in rows) and any(r.get("test/acc") for r in rows)
    line = next(l for l in result.stdout.splitlines() if l.startswith("mlflow: not sent"))
    assert dead in line and "metrics from step 0 on" in line and "figures" in line
    assert "outputs/run/mlflow_unsent" in line


@pytest.mark.slow  # two mlflow servers start (~14 s of CPU measured)
def test_mlflow_server_dying_mid_run_is_one_warning_and_the_rest_is_kept(tmp_path, caplog, monkeypatch):
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    from hymtl.loggers import where
    from hymtl.loggers.mlflow import MLflowLogger

    for name, value in (("MAX_RETRIES", "0"), ("TIMEOUT", "5")):  # the logger's settings, undone after the test
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")

    server = MlflowServer(tmp_path / "server")
    try:
        logger = MLflowLogger(tracking_uri=server.url, run_dir=str(tmp_path / "run"), request_retries=0,
                              request_timeout_s=5)
        logger.log_hyperparams({"mode": "frozen"})
        logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=1)
        run_id = logger.run_id
    finally:
        server.stop()
    logger.log_metrics({"val/acc": 0.75, "epoch": 1}, step=3)  # the server is gone
    logger.log_metrics({"val/acc": 1.0, "epoch": 2}, step=5)
    logger.log_hyperparams({"seed": 0})
    logger.save()
    logger.finalize("success")
    warnings = [r for r in caplog.records if "tracking server" in r.getMessage()]
    assert len(warnings) == 1 and "stopped answering" in warnings[0].getMessage()
    rows = list(csv.DictReader((tmp_path / "run" / "mlflow_unsent" / "metrics.csv").open()))
    assert [(int(r["step"]), float(r["val/acc"])) for r in rows] == [(3, 0.75), (5, 1.0)]
    place = where([logger])["mlflow"]
    assert place["run_id"] == run_id and place["not_sent"] == ["metrics from step 3 on", "hyperparameters"]

    server = MlflowServer(tmp_path / "server")  # what it got before it died is there
    try:
        history = MlflowClient(server.url).get_metric_history(run_id, "val/acc")
        assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    finally:
        server.stop()


def test_presets_combine_as_a_list_and_each_holds_one_named_entry(compose, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose("logger=[tensorboard,mlflow,csv,wandb]")
    assert list(cfg.logger) == ["tensorboard", "mlflow", "csv", "wandb"]
    assert cfg.logger.mlflow.tracking_uri is None and cfg.logger.mlflow.save_dir == "outputs/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compose("logger=mlflow").logger.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert list(compose().logger) == ["tensorboard"] and compose("~logger").get("logger") is None


def test_a_missing_package_is_one_line_naming_the_pip_install(monkeypatch):
    from hymtl.errors import HymtlError
    from hymtl.loggers import check_packages

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(HymtlError, match=r"^logger=wandb needs the wandb package: pip install 'hymtl\[wandb\]'"):
        check_packages({"tensorboard": {}, "wandb": {}})
    check_packages({"tensorboard": {}, "csv": {}})


def test_an_unknown_logger_lists_the_presets(tmp_path):
    result = run_train("logger=mlfow", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: logger=mlfow: no such option in logger; did you mean mlflow?"), line
    for preset in ("csv", "mlflow", "tensorboard", "wandb"):
        assert preset in line, preset


# --------------------------------------------------------------------------- W&B offline
def _wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header; W&B's own reader lives in its Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts = path.read_bytes(), 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        parts.append(data[pos:pos + length])
        pos += length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@pytest.mark.slow
def test_wandb_without_a_login_runs_offline_in_the_run_folder(tmp_path):
    _needs("wandb")
    result, run = _run(tmp_path, "logger=wandb")
    said = [l for l in result.stdout.splitlines() + result.stderr.splitlines() if "wandb: offline (" in l]
    assert len(said) == 1 and "not logged in" in said[0], said
    place = json.loads((run / "metrics.json").read_text())["loggers"]["wandb"]
    folder = Path(place["dir"])
    assert place["offline"] and folder.parent == run / "wandb" and folder.name.startswith("offline-run-")
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"wandb: offline run {place['run_id']} in {folder.relative_to(tmp_path)}: " \
                   f"wandb sync {folder.relative_to(tmp_path)}"

    history, summary, config = [], {}, {}
    for record in _wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert sorted(h["epoch"] for h in history if "val/acc" in h) == [0, 1]
    assert sorted(h["epoch"] for h in history if "train/loss" in h) == [0, 1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"]) and summary["hp_metric"] == pytest.approx(metrics["test/acc"])
    assert summary["epochs"] == 2 and summary["best_checkpoint"] == metrics["best_checkpoint"]
    assert config["mode"] == "frozen" and config["model.backbone"] == "efficientnet_lite0"
    images = {p.name.split("_")[0] for p in (folder / "files" / "media" / "images" / "test").glob("*.png")}
    assert images == {"confusion", "predictions", "most"}


# --------------------------------------------------------------------------- early stopping
def test_early_stopping_follows_the_checkpoints_monitor_and_the_regime(compose):
    cfg = compose("callbacks=early_stopping", "mode=two_phase")
    stop = cfg.callbacks.early_stopping
    assert (stop.monitor, stop.mode) == ("val/acc", "max")  # the phase is asked of the module
    assert "model_checkpoint" in cfg.callbacks and "run_summary" in cfg.callbacks  # the defaults stay
    cfg = compose("callbacks=early_stopping", "callbacks.model_checkpoint.monitor=val/loss",
                  "callbacks.model_checkpoint.mode=min")
    assert (cfg.callbacks.early_stopping.monitor, cfg.callbacks.early_stopping.mode) == ("val/loss", "min")
    assert "early_stopping" not in compose().callbacks


def _never_improves(patience: int) -> list[str]:
    # min_delta 1 on an accuracy: only the first epoch improves, so the count is fixed by the epochs
    return ["callbacks=early_stopping", f"callbacks.early_stopping.patience={patience}",
            "callbacks.early_stopping.min_delta=1.0"]


@pytest.mark.slow
def test_two_phase_never_stops_before_the_unfreeze_epoch_plus_patience(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=3)
    result = run_train(*TINY_MODEL, "data=folder", f"data.root={images}", "mode=two_phase", "mode.freeze_epochs=2",
                       "mode.epochs=10", *_never_improves(2), "+trainer.limit_train_batches=1", "hydra.run.dir=run",
                       cwd=tmp_path, env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # plain EarlyStopping would stop after epoch 2 (3 epochs); here: unfreeze epoch 2 + patience 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 4
    assert "early stopping after epoch 3: " in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_a_resumed_run_keeps_its_patience_counter(tmp_path):
    import torch

    images = make_image_folder(tmp_path / "images", per_class=3)
    args = [*FROZEN, f"data.root={images}", *_never_improves(3), "hydra.run.dir=run"]
    env = {"HYMTL_CACHE_DIR": str(tmp_path / "cache")}
    first = run_train(*args, "mode.epochs=2", "test=false", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (stopping,) = [v for k, v in state.items() if k.startswith("EarlyStopping")]
    assert stopping["wait_count"] == 1
    resumed = run_train(*args, "mode.epochs=10", "ckpt_path=last", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # kept: epochs 2 and 3 make the count 3; a fresh counter would have run to epoch 5
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 4


# --------------------------------------------------------------------------- sweeps
def test_sweep_end_lines_name_every_logger_of_the_runs(tmp_path, monkeypatch):
    from hymtl.summaries import collect_runs, sweep_end_lines

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "outputs" / "multirun" / "x"
    for n in range(2):
        run = sweep / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={n}\n")
        (run / "metrics.json").write_text(json.dumps({"test/acc": 0.5, "loggers": {
            "tensorboard": {}, "csv": {"metrics_csv": str(run / "csv" / "metrics.csv")},
            "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment_id": "3", "experiment_name": "hymtl",
                       "run_id": f"r{n}"},
            "wandb": {"offline": True, "run_id": f"w{n}", "dir": str(run / "wandb" / f"offline-run-{n}")}}}))
    lines = sweep_end_lines(sweep, collect_runs(sweep))
    assert lines[1:] == [
        "dashboard: tensorboard --logdir outputs/multirun/x",
        "mlflow: experiment hymtl (id 3), 2 runs: http://127.0.0.1:5000/#/experiments/3",
        "wandb: 2 offline runs: wandb sync outputs/multirun/x/0/wandb/offline-run-0 outputs/multirun/x/1/wandb/offline-run-1",
        "csv: outputs/multirun/x/*/csv/metrics.csv (2 runs)",
    ]

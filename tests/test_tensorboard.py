"""TensorBoard, checked with the real thing: the event files (TensorBoard's own reader), a
``tensorboard`` server's HTTP API, and the dashboard rendered by headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image_folder, stop_process
from hymtl.errors import HymtlError
from test_train import TINY_MODEL, run_train

RUN_NAME = "run/tensorboard"  # the run as TensorBoard names it below --logdir outputs
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    """One tiny two-phase run (head only in epoch 0, backbone from epoch 1), every step logged."""
    base = tmp_path_factory.mktemp("tb")
    images = make_image_folder(base / "images", per_class=6)
    run = base / "outputs" / "run"
    result = run_train(*TINY_MODEL, "mode=two_phase", "mode.epochs=2", "mode.freeze_epochs=1", "data=folder",
                       f"data.root={images}", "trainer.log_every_n_steps=1", "+trainer.limit_train_batches=3",
                       f"hydra.run.dir={run}", cwd=base, env={"HYMTL_CACHE_DIR": str(base / "cache")}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _accumulator(run: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_event_files_hold_step_and_epoch_scalars_lrs_hparams_and_test_figures(tb_run):
    acc = _accumulator(tb_run)
    metrics = json.loads((tb_run / "metrics.json").read_text())
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    assert len(scalars["train/loss_step"]) == 6  # per step: 2 epochs x 3 batches
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        assert len(scalars[tag]) == 2, tag  # per epoch
    assert scalars["test/acc"][-1][1] == pytest.approx(metrics["test/acc"])

    # learning rate per parameter group, by hand: head lr*head_lr_mult*cosine(epoch, 2),
    # backbone 0 while frozen, then lr*backbone_lr_mult with its own schedule restarting
    head = [v for _, v in scalars["lr-SGD/head"]]
    backbone = [v for _, v in scalars["lr-SGD/backbone"]]
    assert head == pytest.approx([1e-3 * 10 * 1.0, 1e-3 * 10 * 0.5])
    assert backbone == pytest.approx([0.0, 1e-3 * 0.5])  # the two-phase switch

    # hp_metric = the optimised metric, with the run's hyperparameters (curated + command line)
    assert scalars["hp_metric"][-1][1] == pytest.approx(metrics["test/acc"])
    from tensorboard.plugins.hparams import metadata as hp_metadata

    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hparams = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hparams["mode"] == "two_phase" and hparams["model.backbone"] == "efficientnet_lite0"
    assert hparams["mode.freeze_epochs"] == 1 and hparams["mode.lr"] == pytest.approx(1e-3)
    assert hparams["data.batch_size"] == 4
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric"]

    # the test figures, as PNGs in the event file and beside the run
    assert set(acc.Tags()["images"]) == {"test/confusion_matrix", "test/predictions", "test/most_wrong"}
    for tag in acc.Tags()["images"]:
        (event,) = acc.Images(tag)
        image = Image.open(io.BytesIO(event.encoded_image_string))
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200, tag
    for name in ("confusion_matrix", "predictions", "most_wrong"):
        assert Image.open(tb_run / "figures" / f"{name}.png").format == "PNG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None, timeout: float = 60.0) -> bytes:
    headers = {"X-XSRF-Protected": "1", "Content-Type": "application/json"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as response:
        return response.read()


@pytest.fixture(scope="module")
def tb_server(tb_run):
    """A real ``tensorboard`` on a free localhost port, serving the run's outputs/ folder."""
    port = _free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen(
        [str(tensorboard), "--logdir", str(tb_run.parent), "--port", str(port), "--host", "127.0.0.1",
         "--load_fast=false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a hang guard: ten times a quiet start
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                tags = json.loads(_get(f"{url}/data/plugin/images/tags", timeout=5))
                if tags.get(RUN_NAME):  # the last thing written: the whole run is loaded
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the run within 600 s")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc, timeout=15)


@pytest.mark.slow
def test_tensorboard_server_serves_scalars_images_and_hparams(tb_server):
    assert RUN_NAME in json.loads(_get(f"{tb_server}/data/runs"))
    scalar_tags = json.loads(_get(f"{tb_server}/data/plugin/scalars/tags"))[RUN_NAME]
    assert {"train/loss_step", "train/loss", "val/acc", "lr-SGD/head", "lr-SGD/backbone", "hp_metric"} <= set(scalar_tags)
    query = urllib.parse.urlencode({"run": RUN_NAME, "tag": "lr-SGD/backbone"})
    points = json.loads(_get(f"{tb_server}/data/plugin/scalars/scalars?{query}"))
    assert [value for _wall, _step, value in points] == pytest.approx([0.0, 5e-4])

    image_tags = json.loads(_get(f"{tb_server}/data/plugin/images/tags"))[RUN_NAME]
    assert set(image_tags) == {"test/confusion_matrix", "test/predictions", "test/most_wrong"}
    query = urllib.parse.urlencode({"run": RUN_NAME, "tag": "test/confusion_matrix"})
    (sample,) = json.loads(_get(f"{tb_server}/data/plugin/images/images?{query}"))
    png = _get(f"{tb_server}/data/plugin/images/individualImage?{sample['query']}")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and Image.open(io.BytesIO(png)).width >= 300

    experiment = json.loads(_get(f"{tb_server}/data/plugin/hparams/experiment", data=b'{"experimentName": ""}'))
    assert {"mode", "model.backbone", "seed", "mode.lr"} <= {h["name"] for h in experiment["hparamInfos"]}
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["hp_metric"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (CI installs the Debian packages chromium and chromium-driver: .ci/run)")
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    return found


def _chromium_run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # a fresh profile per call: no state, no first-run UI; virtual time lets the page's
    # scripts fetch and draw before the capture
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(tb_server, tmp_path):
    chromium = _chromium()
    # the Time Series dashboard is plain DOM: its rendered page names the run's tag groups
    dom = _chromium_run(chromium, tmp_path / "profile-dom", "--dump-dom", f"{tb_server}/#timeseries")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("lr-SGD", "hp_metric"):
        assert text in dom.stdout, text

    shot = tmp_path / "scalars.png"
    tag_filter = urllib.parse.quote("lr-SGD|val/acc$|train/loss$", safe="")
    result = _chromium_run(chromium, tmp_path / "profile-shot", f"--screenshot={shot}",
                           f"{tb_server}/#scalars&tagFilter={tag_filter}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    # a drawn dashboard, not a blank or error page: TensorBoard's orange header and many colours
    assert image.getpixel((700, 20))[0] > 200 and image.getpixel((700, 20))[2] < 100
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 200 or image.getcolors(maxcolors=1 << 16) is None
    if os.environ.get("HYMTL_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(shot, Path(os.environ["HYMTL_SCREENSHOT_DIR"]) / "tensorboard_scalars.png")


# --------------------------------------------------------------------------- callbacks in process
def _tiny_fit(callbacks):
    """Two epochs of a tiny classifier on random tensors, in this process; returns the test step."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from hymtl.tutorial import ClassifierModule

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 2)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    module = ClassifierModule(net, 2, class_names=["ants", "bees"], lr=0.01)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    return lambda: trainer.test(module, DataLoader(data, batch_size=8), verbose=False)


def test_run_summary_writes_metrics_json_after_the_test_and_prints_the_two_lines(tmp_path, capsys, caplog):
    from hymtl.callbacks import RunSummary, ExamplesPerSecond

    skipped = tmp_path / "skipped.txt"
    skipped.write_text("unreadable\tbad/one.jpg\n")
    summary = RunSummary(tmp_path / "metrics.json", mode="finetune", backbone="tiny", skipped_file=skipped)
    test = _tiny_fit([ExamplesPerSecond(), summary])
    assert not (tmp_path / "metrics.json").exists()  # a test follows: nothing written yet
    test()

    written = RunSummary.read(tmp_path / "metrics.json")
    assert written == json.loads(json.dumps(summary.metrics)) == json.loads(json.dumps(summary.result()))
    assert {"train/loss", "train/acc", "val/acc", "val/acc_best", "test/acc", "test/loss"} <= set(written)
    assert "train/examples_per_sec" not in written and written["examples_per_sec"] > 0
    assert written["epochs"] == 2 and written["wall_time_s"] > 0
    assert (written["mode"], written["backbone"], written["class_names"]) == ("finetune", "tiny", ["ants", "bees"])
    assert written["device"] == "cpu" and written["best_checkpoint"] is None and written["skipped_files"] == 1
    assert str(skipped) in caplog.text  # one warning that points at the list
    out = capsys.readouterr().out
    assert re.search(r"^loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n\d+\.\d examples/sec on cpu$", out, re.M)


def test_run_summary_without_a_test_writes_at_the_end_of_fit(tmp_path):
    from hymtl.callbacks import RunSummary

    summary = RunSummary(tmp_path / "metrics.json", mode="frozen", backbone="tiny", expect_test=False)
    _tiny_fit([summary])
    written = RunSummary.read(tmp_path / "metrics.json")
    assert written["epochs"] == 2 and written["skipped_files"] == 0 and "test/acc" not in written
    assert written["examples_per_sec"] is None  # no ExamplesPerSecond: nothing published
    with pytest.raises(HymtlError, match="cannot read the run's metrics"):
        RunSummary.read(tmp_path / "missing.json")


def test_hparams_logger_reads_the_command_lines_overrides(compose):
    from hydra.core.hydra_config import HydraConfig

    from hymtl.callbacks import HParamsLogger

    cfg = compose("mode=frozen", "mode.lr=0.01", "seed=3", "data.batch_size=4", "experiment=tutorial")
    HydraConfig.instance().set_config(cfg)
    try:
        logger = HParamsLogger(hparams={"mode": "frozen"})
        assert logger.hparams == {"mode": "frozen", "mode.lr": 0.01, "seed": 3, "data.batch_size": 4}
        assert HParamsLogger(command_line=False).hparams == {}
    finally:
        HydraConfig.instance().cfg = None

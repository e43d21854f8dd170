"""``mode=auto``: the depth search (head, then one more top stage per step, driven by validation,
within a budget) and the time budget of every regime (``budget=5m``)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import SMALL_VIEWS, make_image_folder, make_multilabel_set
from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.depth_search import DEEPER_EPOCH_COST, DepthSearch
from hymtl.errors import HymtlError
from hymtl.features import FeatureBatch, FeatureServer
from hymtl.model import TransferModule
from test_train import TINY_MODEL, run_train

SMALL = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)
# every step one epoch, always deeper (a negative margin), so a short fit walks every step
EVERY_STEP = {"step_epochs": 1, "head_epochs": 1, "margin": -1.0, "first_cut": 2}


# --------------------------------------------------------------------------- the decision, alone
def _feed(search: DepthSearch, epochs: list[tuple[float, float]], start: int = 0) -> list[str | None]:
    return [search.record(epoch, metric, seconds) for epoch, (metric, seconds) in enumerate(epochs, start=start)]


def test_it_goes_deeper_while_a_step_pays_and_stops_when_one_does_not():
    search = DepthSearch(max_stages=3, step_epochs=2, margin=0.01)
    lines = _feed(search, [(0.50, 1), (0.60, 1), (0.62, 1), (0.65, 1), (0.655, 1), (0.65, 1)])
    assert lines[0] is None and "going deeper: the top 1 stage from epoch 2" in lines[1]
    assert "(+0.0500 over the steps before)" in lines[3] and "going deeper: the top 2 stages from epoch 4" in lines[3]
    assert "stopped: going one stage deeper gained +0.0050, not more than the margin 0.01" in lines[5]
    assert search.stopped and [(s.stages, s.start_epoch) for s in search.steps] == [(0, 0), (1, 2), (2, 4)]
    assert [search.stages_at(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [search.epoch_in_step(e) for e in (0, 1, 2, 5)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    summary = search.summary()
    assert summary["chosen_stages"] == 2 and [s["stages"] for s in summary["steps"]] == [0, 1, 2]
    assert summary["decision"].startswith("stopped: going one stage deeper gained")


def test_patience_looks_one_stage_past_a_flat_step_and_two_flat_steps_in_a_row_stop_it():
    search = DepthSearch(max_stages=5, step_epochs=1, margin=0.01, patience=1)
    # step 1 gains nothing, step 2 gains 0.05 (counted against the best before it: step 0's 0.60),
    # then steps 3 and 4 gain nothing: the second flat step in a row stops the search
    lines = _feed(search, [(0.60, 1), (0.605, 1), (0.65, 1), (0.65, 1), (0.655, 1)])
    assert "(+0.0050 over the steps before)" in lines[1]
    assert "going deeper (1 step in a row without a gain over the margin; patience 1): the top 2 stages" in lines[1]
    assert "going deeper: the top 3 stages" in lines[2]  # step 2 paid: the count starts again
    assert "going deeper (1 step in a row" in lines[3]
    assert lines[4].endswith("stopped: going one stage deeper gained +0.0050, not more than the margin 0.01, "
                             "2 steps in a row (patience 1)")
    assert search.best_step().stages == 4 and search.summary()["chosen_stages"] == 4
    # the count is the steps', so a resumed search decides as the interrupted one would have
    resumed = DepthSearch(max_stages=5, step_epochs=1, margin=0.01, patience=1)
    resumed.load_state_dict(json.loads(json.dumps(search.state_dict())))
    assert resumed.flat_steps() == 2
    # without patience the first flat step stops it, as before
    strict = DepthSearch(max_stages=4, step_epochs=1, margin=0.01)
    assert "stopped: going one stage deeper gained +0.0050, not more than the margin 0.01" in _feed(
        strict, [(0.60, 1), (0.605, 1)])[1] and strict.stopped


def test_the_head_alone_runs_head_epochs_and_each_deeper_step_step_epochs():
    search = DepthSearch(max_stages=2, step_epochs=2, head_epochs=3, margin=-1.0)
    lines = _feed(search, [(0.5, 1)] * 7)
    assert [line is not None for line in lines] == [False, False, True, False, True, False, True]
    assert [(s.stages, s.start_epoch) for s in search.steps] == [(0, 0), (1, 3), (2, 5)]
    assert [search.epoch_in_step(e) for e in (0, 2, 3, 6)] == [(0, 3), (2, 3), (0, 2), (1, 2)]


def test_it_stops_at_the_deepest_step_allowed():
    search = DepthSearch(max_stages=1, step_epochs=1, margin=0.0)
    lines = _feed(search, [(0.5, 1), (0.9, 1)])
    assert "going deeper" in lines[0] and "stopped at the deepest step allowed (the top 1 stage)" in lines[1]


def test_the_next_step_is_estimated_from_the_steps_measured_and_must_fit_the_budget():
    # step 0: the first epoch holds the extraction (10 s), the others take 1 s
    search = DepthSearch(max_stages=3, step_epochs=2, margin=0.0, budget="20s", first_cut=2)
    lines = _feed(search, [(0.5, 10.0), (0.6, 1.0)])
    assert "going deeper" in lines[1] and "(~2 s of 9 s left)" in lines[1]  # same cut: no extraction
    lines = _feed(search, [(0.7, 2.0), (0.8, 2.0)], start=2)
    # one stage deeper costs DEEPER_EPOCH_COST x the step's epochs: 2 x 2 s x 2 = 8 s > 5 s left
    assert search.next_step_seconds() == pytest.approx(2 * 2.0 * DEEPER_EPOCH_COST)
    assert "stopped: the next step (the top 2 stages) would take ~8 s, 5 s of the budget 20 s are left" in lines[1]
    # below the first cut a step extracts again: the first epoch of step 0 less its others (9 s)
    lower = DepthSearch(max_stages=3, step_epochs=2, margin=0.5, first_cut=1)  # stops after step 1
    _feed(lower, [(0.5, 10.0), (0.6, 1.0)])
    _feed(lower, [(0.7, 2.0), (0.8, 2.0)], start=2)
    assert lower.next_step_seconds() == pytest.approx(2 * 2.0 * DEEPER_EPOCH_COST + 9.0)


def test_steps_one_to_first_cut_share_one_cut_and_the_state_round_trips():
    search = DepthSearch(max_stages=3, **EVERY_STEP)
    assert [search.cut_depth(n) for n in range(4)] == [2, 2, 2, 3]
    assert DepthSearch(max_stages=1, first_cut=2).cut_depth(0) == 1
    _feed(search, [(0.5, 1.0), (0.6, 1.5)])
    again = DepthSearch(max_stages=3, **EVERY_STEP)
    again.load_state_dict(json.loads(json.dumps(search.state_dict())))  # plain containers
    assert again.state_dict() == search.state_dict() and again.stages_at(2) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget must be a positive duration, got 0"),
    ({"budget": "abc"}, "budget must be a duration: seconds (300) or with a unit (90s, 5m, 1h30m), got 'abc'"),
    ({"step_epochs": 0}, "mode.depth_search.step_epochs must be a positive integer, got 0"),
    ({"first_cut": 1.5}, "mode.depth_search.first_cut must be an integer, got 1.5"),
    ({"patience": -1}, "mode.depth_search.patience must not be negative, got -1"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(HymtlError) as error:
        DepthSearch(max_stages=3, **kwargs)
    assert str(error.value) == message


# --------------------------------------------------------------------------- the module walks the steps
def _auto_module(**search) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, class_names=["a", "b"],
                          unfreeze_at_epoch=0, trainable_stages=3, lr=0.01,
                          scheduler={"_target_": "hymtl.model.constant_schedule"},
                          depth_search={**EVERY_STEP, **search})


def _stage_weights(module: TransferModule) -> dict[str, torch.Tensor]:
    return {stage.name: torch.cat([p.detach().flatten().clone() for p in stage.parameters(module.backbone)])
            for stage in module.backbone_stages if list(stage.parameters(module.backbone))}


class StepProbe(pl.Callback):
    """Per epoch: what the first batch held, which stages had gradients on, the stage weights after."""

    def __init__(self):
        self.seen, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            trainable = {s.name for s in pl_module.backbone_stages
                         if any(p.requires_grad for p in s.parameters(pl_module.backbone))}
            self.seen[trainer.current_epoch] = (isinstance(batch, FeatureBatch), tuple(batch[0].shape[1:]), trainable)

    def on_train_epoch_end(self, trainer, pl_module):
        self.after[trainer.current_epoch] = _stage_weights(pl_module)


@pytest.mark.slow
def test_each_step_trains_one_stage_more_on_activations_extracted_once_per_cut(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4)
    module = _auto_module()
    names = [s.name for s in module.backbone_stages]
    before = _stage_weights(module)
    features = FeatureServer(precompute=True, enabled=False)
    datamodule = ImageFolderDataModule(root=str(images), batch_size=4, num_workers=0, preprocessing=SMALL,
                                       features=features)
    probe = StepProbe()
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         precision="32-true", callbacks=[probe], **features.trainer_kwargs(module))
    trainer.fit(module, datamodule=datamodule)

    # four steps of one epoch (head, top 1, 2, 3 stages), then the deepest allowed: the fit ends
    assert trainer.current_epoch == 4 and module.depth_search.stopped
    assert [s.stages for s in module.depth_search.steps] == [0, 1, 2, 3]
    top3 = names[-3:]
    assert [probe.seen[e][2] for e in range(4)] == [set(), set(top3[2:]), set(top3[1:]), set(top3)]
    # activations, never images: steps 0-2 below the top 2 stages, step 3 below the top 3
    assert all(probe.seen[e][0] for e in range(4))
    assert probe.seen[0][1] == probe.seen[1][1] == probe.seen[2][1] != probe.seen[3][1]
    assert sorted(features._extractors) == [len(names) - 3, len(names) - 2]  # one extraction per cut
    # a stage changes only from its step on; the prefix below the search never does
    changed = {e: {n for n in before if not torch.equal(before[n], probe.after[e][n])} for e in range(4)}
    assert changed[0] == set() and changed[1] == {top3[2]} and changed[2] == {top3[1], top3[2]}
    assert changed[3] == set(top3)
    # the test serves what the kept step trained on (the module's current step: the deepest)
    assert module.cached_stages_at(None) == len(names) - 3


@pytest.mark.slow
def test_checkpoints_carry_the_search_and_a_loaded_module_serves_its_step(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4)
    module = _auto_module()
    features = FeatureServer(precompute=True, enabled=False)
    datamodule = ImageFolderDataModule(root=str(images), batch_size=4, num_workers=0, preprocessing=SMALL,
                                       features=features)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, precision="32-true",
                         callbacks=[checkpoints], **features.trainer_kwargs(module))
    trainer.fit(module, datamodule=datamodule)
    saved = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)
    # decided at epoch 1's validation, before its checkpoint: the next step is in it
    assert [s["stages"] for s in saved["depth_search"]["steps"]] == [0, 1, 2]
    fresh = _auto_module()
    fresh.on_load_checkpoint(saved)
    assert fresh.stages_training_at(None) == fresh.trainable_stage_names[-2:]


# --------------------------------------------------------------------------- the time budget
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _budget_trainer(epoch: int, max_epochs: int = 10):
    return SimpleNamespace(should_stop=False, world_size=1, current_epoch=epoch, max_epochs=max_epochs,
                           is_global_zero=True)


def test_the_budget_stops_after_the_last_epoch_that_fits_and_says_what_it_cut(monkeypatch, caplog):
    from hymtl import callbacks

    clock = _Clock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)  # epochs of exactly 3 s
    budget = callbacks.TimeBudget(budget="10s")
    budget.on_fit_start(None, None)
    stops = []
    for epoch in range(4):
        clock.now += 3.0
        trainer = _budget_trainer(epoch)
        with caplog.at_level(logging.WARNING, logger="hymtl.callbacks"):
            budget.on_train_epoch_end(trainer, None)
        stops.append(trainer.should_stop)
        if trainer.should_stop:
            break
    # after 9 s the next epoch would end near 12 s > 10 s
    assert stops == [False, False, True]
    assert "budget 10 s: stopping after epoch 2 (9 s in; the next would end near 12 s); cut: 7 of 10 epochs" in caplog.text


def test_a_budget_shorter_than_the_first_epoch_names_the_smallest_that_would_run(monkeypatch):
    from hymtl import callbacks

    clock = _Clock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    budget = callbacks.TimeBudget(budget=10)
    budget.on_fit_start(None, None)
    clock.now += 12.5
    with pytest.raises(HymtlError, match=r"budget=10 s is shorter than the run's first epoch \(12 s, the feature "
                                         r"extraction included\): the smallest budget that would run is 15 s"):
        budget.on_train_epoch_end(_budget_trainer(0), None)


def test_auto_composes_with_a_cpu_budget_and_budget_overrides_it(compose):
    cfg = compose("mode=auto", "trainer=cpu")
    assert cfg.budget == "5m" and cfg.model.depth_search.budget == "5m" and cfg.callbacks.time_budget.budget == "5m"
    assert cfg.model.trainable_stages == 3 and cfg.model.unfreeze_at_epoch == 0
    cfg = compose("mode=auto", "budget=90s")
    assert cfg.model.depth_search.budget == cfg.callbacks.time_budget.budget == "90s"
    assert compose("mode=partial").budget is None  # no ceiling unless asked


# --------------------------------------------------------------------------- end to end
AUTO = [*TINY_MODEL, SMALL_VIEWS, "data=folder", "mode=auto", "mode.depth_search.step_epochs=1",
        "mode.depth_search.head_epochs=1", "mode.depth_search.margin=-1",
        "callbacks.test_figures=null", "callbacks.last_checkpoint.min_interval_s=0"]


@pytest.mark.parametrize("budget, message", [
    ("0", "error: budget must be a positive duration, got 0"),
    ("abc", "error: budget must be a duration: seconds (300) or with a unit (90s, 5m, 1h30m), got 'abc'"),
])
def test_a_bad_budget_is_one_line_and_exit_2(tmp_path, budget, message):
    result = run_train(*AUTO, f"data.root={tmp_path}", f"budget={budget}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == message, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_auto_runs_logs_each_step_and_a_resumed_run_continues_the_step_it_was_in(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4)
    env = {"HYMTL_CACHE_DIR": str(tmp_path / "cache")}
    whole = run_train(*AUTO, f"data.root={images}", "hydra.run.dir=whole", cwd=tmp_path, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    steps = metrics["depth_search"]["steps"]
    assert [(s["stages"], s["start_epoch"], s["epochs"]) for s in steps] == [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]
    assert metrics["depth_search"]["decision"] == "stopped at the deepest step allowed (the top 3 stages)"
    assert metrics["epochs"] == 4 and metrics["mode"] == "auto" and "test/acc" in metrics
    log = (tmp_path / "whole" / "train.log").read_text()
    assert "depth search (mode=auto) over the top 3 stages of efficientnet_lite0" in log
    assert all(f"depth search: step {n} trained" in log for n in range(4))

    # stopped after two epochs (step 1 done, step 2 decided), then resumed: it goes on in step 2
    first = run_train(*AUTO, f"data.root={images}", "hydra.run.dir=resumed", "mode.epochs=2", "test=false",
                      cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(*AUTO, f"data.root={images}", "hydra.run.dir=resumed", "ckpt_path=last", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["depth_search"]["steps"]
    assert [(s["stages"], s["start_epoch"], s["epochs"]) for s in resumed] == [
        (s["stages"], s["start_epoch"], s["epochs"]) for s in steps]


@pytest.mark.slow
def test_auto_with_several_labels_per_image(tmp_path):
    table = make_multilabel_set(tmp_path / "set", count=16, size=48)
    result = run_train(*AUTO, "task=multilabel", "data=table", f"data.file={table}", "mode.trainable_stages=2",
                       "hydra.run.dir=run", cwd=tmp_path, env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s["stages"] for s in metrics["depth_search"]["steps"]] == [0, 1, 2]
    assert "test/f1_macro" in metrics and "test/map" in metrics


@pytest.mark.slow
def test_a_budget_smaller_than_the_first_epoch_is_one_line_naming_the_smallest(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=3)
    result = run_train(*AUTO, f"data.root={images}", "budget=0.001", "hydra.run.dir=run", cwd=tmp_path,
                       env={"HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: budget=0.001 s is shorter than the run's first epoch (") and \
        "the smallest budget that would run is " in last, last
    assert "Traceback" not in result.stderr

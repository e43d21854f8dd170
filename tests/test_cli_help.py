"""The command line as a new user meets it: ``--help`` of every entry point, and what a wrong
key, group option or value gets (issue 34, items 2 and 3; issue 33's ``mode=bogus`` and
``precision=garbage``): one ``error:`` line naming it and the nearest valid ones, exit code 2,
no traceback, and no run folder left behind. Real subprocesses of the real entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import entry_command, make_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
#: every entry point built with hymtl.cli.hymtl_main (a new one is checked here once it exists)
ENTRY_POINTS = sorted(
    path.stem for path in (REPO_ROOT / "hymtl").glob("*.py")
    if re.search(r"^@hymtl_main\(", path.read_text(encoding="utf-8"), re.MULTILINE)
)


def run_cli(entry: str, *args: str, cwd: Path, outputs: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYMTL_OUTPUT_DIR=str(outputs), PYTHONPATH=str(REPO_ROOT))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*entry_command(f"hymtl.{entry}"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr holding every needle, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def folders_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_dir()) if path.exists() else []


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """A launch folder and an outputs folder that does not exist yet (``HYMTL_OUTPUT_DIR``)."""
    launch = tmp_path / "launch"
    launch.mkdir()
    return {"cwd": launch, "outputs": tmp_path / "outputs", "images": make_image_folder(tmp_path / "images")}


# --------------------------------------------------------------------------- --help
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_says_what_it_does_with_groups_examples_and_results(entry: str, tmp_path: Path) -> None:
    result = run_cli(entry, "--help", cwd=tmp_path, outputs=tmp_path / "outputs")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith(f"python -m hymtl.{entry}: ")
    for section in ("usage: ", "Config groups", "Settings", "Examples:", "Results: "):
        assert section in text, text
    examples = text.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) == 5 and all(line.startswith(f"  python -m hymtl.{entry} ") for line in examples), examples
    # no internal files among the choices, no config dump
    assert not re.search(r"_shared|_transfer|_base|\?\?\?", text), text
    assert len(text.splitlines()) < 60
    assert not folders_under(tmp_path / "outputs")


def test_train_help_lists_each_group_on_one_line_with_the_choice_starred(tmp_path: Path) -> None:
    result = run_cli("train", "--help", "mode=frozen", cwd=tmp_path, outputs=tmp_path / "outputs")
    assert result.returncode == 0, result.stderr[-3000:]
    groups = {line.split()[0]: line for line in result.stdout.split("Config groups", 1)[1].split("\n\n", 1)[0]
              .splitlines()[1:]}
    assert list(groups)[:3] == ["mode", "model", "data"]
    assert {"trainer", "logger", "callbacks", "paths", "experiment", "hparams_search"} <= set(groups)
    assert all(": " in line for line in groups.values()), groups  # every group says what it sets
    assert groups["mode"].endswith("finetune, frozen*, partial, two_phase")
    assert "resnet18*" in groups["model"] and "efficientnet_lite0," in groups["model"]
    assert "mode.epochs=20 " in result.stdout  # the settings show the values of the chosen mode


def test_hydra_flags_still_work(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    shown = run_cli("train", "--cfg", "job", "mode=frozen", "hydra.verbose=true", cwd=tmp_path, outputs=outputs)
    assert shown.returncode == 0 and "unfreeze_at_epoch: null" in shown.stdout, shown.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COMP_LINE="hymtl-train mode=", COMP_POINT="17")
    completion = subprocess.run([sys.executable, "-m", "hymtl.train", "-sc", "query=bash"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
    assert completion.stdout.split() == ["mode=auto", "mode=finetune", "mode=frozen", "mode=partial", "mode=two_phase"]
    assert not folders_under(outputs)


# --------------------------------------------------------------------------- wrong input: one line
#: overrides Hydra refuses while composing: no torch import, no folder ever claimed
COMPOSE_ERRORS = [
    (["logger=neptune"], ["logger=neptune: no such option in logger", "csv", "mlflow", "tensorboard", "wandb"]),
    (["mode=bogus"], ["mode=bogus", "finetune, frozen, partial, two_phase"]),
    (["mode=frozn"], ["mode=frozn", "did you mean frozen"]),
    (["mode=_shared"], ["mode=_shared", "finetune"]),  # internal files are no options
    (["model=_transfer"], ["model=_transfer", "efficientnet_lite0"]),
    (["data.labels_csv=x"], ["data.labels_csv"]),
    (["data.batchsize=3"], ["data.batchsize", "did you mean data.batch_size"]),
    (["precision=garbage"], ["unknown key precision", "trainer.precision"]),
    (["mode=[a"], ["mode=[a"]),
    (["--cfg", "job", "logger=neptune"], ["logger=neptune"]),
    (["--help", "mode=bogus"], ["mode=bogus"]),
    (["-m", "mode=frozen,bogus", "model=efficientnet_lite0"], ["mode=bogus"]),
]


# a multirun's error comes after torch is imported (~6 s of CPU measured): in the slow set
@pytest.mark.parametrize(("args", "needles"), [
    pytest.param(args, needles, id=" ".join(args), marks=[pytest.mark.slow] if args[0] == "-m" else [])
    for args, needles in COMPOSE_ERRORS])
def test_config_hydra_refuses_is_one_error_line(args: list[str], needles: list[str], workspace) -> None:
    result = run_cli("train", *args, "data=folder", f"data.root={workspace['images']}", cwd=workspace["cwd"],
                     outputs=workspace["outputs"])
    assert_one_error(result, *needles)
    assert not folders_under(workspace["outputs"]) and not folders_under(workspace["cwd"])


#: composed fine, refused before the task runs (hymtl.config.check_targets / check_numbers):
#: the run folder was claimed, and is removed again
TASK_ERRORS = [
    (["+data.labels_csv=x"], ["data.labels_csv", "is not a setting"]),  # the data source's own check
    (["trainer.precision=garbage"], ["trainer.precision=garbage", "32-true"]),
    (["trainer.max_epochs=abc"], ["trainer.max_epochs", "'abc'"]),
    (["+model.dropuot=0.1"], ["model.dropuot", "did you mean model.dropout"]),
    (["data.root=/nonexistent/images"], ["/nonexistent/images"]),
    (["model.backbone=nonexistent_net"], ["nonexistent_net", "efficientnet_lite0"]),  # after the file scan
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needles"), TASK_ERRORS, ids=[" ".join(a) for a, _ in TASK_ERRORS])
def test_refused_before_the_run_starts_leaves_no_folder(args: list[str], needles: list[str], workspace) -> None:
    result = run_cli("train", "data=folder", f"data.root={workspace['images']}", "model=efficientnet_lite0",
                     *args, cwd=workspace["cwd"], outputs=workspace["outputs"])
    assert_one_error(result, *needles)
    assert not folders_under(workspace["outputs"]) and not folders_under(workspace["cwd"])


@pytest.mark.slow
def test_eval_refused_leaves_no_eval_folder(workspace) -> None:
    checkpoint = workspace["cwd"].parent / "run" / "model.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"not a checkpoint")
    for args, needle in ((["+trainer.max_epoch=1"], "did you mean trainer.max_epochs"), ([f"data.root={workspace['images']}"], "model.ckpt")):
        result = run_cli("eval", f"ckpt_path={checkpoint}", *args, cwd=workspace["cwd"], outputs=workspace["outputs"])
        assert_one_error(result, needle)
        assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.ckpt"]  # no eval/<stamp>/


@pytest.mark.parametrize(("args", "needles"), [
    (["precision=garbage"], ["precision", "garbage"]),  # issue 33: predict's own check
    (["formt=csv"], ["formt", "did you mean format"]),
])
def test_predict_wrong_key_or_value_is_one_line(args: list[str], needles: list[str], workspace) -> None:
    result = run_cli("predict", "ckpt_path=x.ckpt", "inputs=[a.jpg]", *args,
                     cwd=workspace["cwd"], outputs=workspace["outputs"])
    assert_one_error(result, *needles)


# --------------------------------------------------------------------------- the pieces
def test_a_claimed_folder_is_released_only_without_work(tmp_path: Path) -> None:
    from hymtl import runs
    from hymtl.runs import holds_no_work

    empty = runs.claim_run_dir(str(tmp_path / "out" / "day" / "t1"), "RUN")
    (Path(empty) / ".hydra").mkdir()
    (Path(empty) / "train.log").write_text("started\n")
    assert runs.release_run_dir(empty, holds_no_work)
    assert not (tmp_path / "out").exists()  # and the parents it created

    worked = runs.claim_run_dir(str(tmp_path / "out" / "day" / "t2"), "RUN")
    (Path(worked) / "checkpoints").mkdir()
    assert not runs.release_run_dir(worked, holds_no_work)
    assert Path(worked).is_dir()

    not_ours = tmp_path / "elsewhere"
    not_ours.mkdir()
    assert not runs.release_run_dir(not_ours, holds_no_work) and not_ours.is_dir()


@pytest.mark.parametrize("overrides", [
    [], ["mode=frozen"], ["mode=two_phase", "mode.freeze_epochs=3"], ["mode=partial", "model=efficientnet_lite0"],
    ["experiment=tutorial"], ["model=timm"], ["trainer=ddp_cpu"], ["data=folder", "data.root=x"],
    ["task=multilabel", "data=table", "data.file=x.csv"], ["data=parquet", "data.files=x"],
])
def test_the_shipped_configs_pass_the_target_check(compose, overrides: list[str]) -> None:
    from hymtl.config import check_targets

    check_targets(compose(*overrides))


def test_config_error_message_leaves_bugs_alone() -> None:
    from hymtl.cli import config_error_message

    assert config_error_message(ValueError("a bug")) is None
    assert config_error_message(KeyError("a bug")) is None

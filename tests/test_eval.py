"""``python -m hymtl.eval``: metrics against hand-computed values, where the report goes,
one-line errors for foreign classes and unusable checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_image_folder
from hymtl.evaluation import EvalError, evaluate, load_checkpoint
from hymtl.runs import run_dir_of, trained_data_root
from test_train import run_train


def _hand_report(ckpt: Path, data_root: Path) -> dict:
    """Predictions with a plain PyTorch loop, metrics counted by hand (no torchmetrics)."""
    from hymtl.data import ImageFolderDataModule
    from hymtl.model import TransferModule

    model = TransferModule.load_from_checkpoint(ckpt, map_location="cpu", pretrained=False, weights_only=True).eval()
    datamodule = ImageFolderDataModule(root=str(data_root), batch_size=16, num_workers=0,
                                       preprocessing=model.preprocessing)
    datamodule.setup("test")
    truth, predicted = [], []
    with torch.inference_mode():
        for images, labels in datamodule.test_dataloader():
            predicted += model(images).argmax(dim=-1).tolist()
            truth += labels.tolist()
    n = len(model.class_names)
    matrix = [[sum(1 for t, p in zip(truth, predicted) if (t, p) == (i, j)) for j in range(n)] for i in range(n)]
    per_class = {}
    for i, name in enumerate(model.class_names):
        tp = matrix[i][i]
        fp = sum(matrix[k][i] for k in range(n)) - tp
        fn = sum(matrix[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": sum(matrix[i])}
    macro = {k: sum(c[k] for c in per_class.values()) / n for k in ("precision", "recall", "f1")}
    return {"confusion_matrix": matrix, "per_class": per_class, "macro": macro,
            "accuracy": sum(matrix[i][i] for i in range(n)) / len(truth), "num_images": len(truth)}


@pytest.mark.realdata
@pytest.mark.slow
def test_eval_on_the_real_data_matches_hand_computed_metrics(real_checkpoint, tmp_path):
    # data.root defaults to the folder the checkpoint was trained on (its run's .hydra/config.yaml);
    # fp32 so that the hand-computed predictions are bit-for-bit the same numerics
    result = run_train(f"ckpt_path={real_checkpoint}", "trainer.precision=32-true", "trainer.accelerator=cpu",
                       module="hymtl.eval", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted((run_dir_of(real_checkpoint) / "eval").glob("*/eval.json"))
    assert outputs, "no eval.json in the checkpoint's run folder"
    report = json.loads(outputs[-1].read_text())

    expected = _hand_report(real_checkpoint, trained_data_root(real_checkpoint))
    assert report["split"] == "val" and report["num_images"] == expected["num_images"] == 153
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    for name, row in expected["per_class"].items():
        for key in ("precision", "recall", "f1"):
            assert report["per_class"][name][key] == pytest.approx(row[key], abs=1e-6), (name, key)
        assert report["per_class"][name]["support"] == row["support"]
    for key in ("precision", "recall", "f1"):
        assert report["macro"][key] == pytest.approx(expected["macro"][key], abs=1e-6), key
    # the model's own test/acc (logged by the module) agrees with the report's accuracy
    assert report["loss"] > 0

    lines = result.stdout.splitlines()
    ants = next(l for l in lines if l.startswith("ants "))
    assert ants.split()[1:] == [f"{expected['per_class']['ants'][k]:.3f}" for k in ("precision", "recall", "f1")] + \
        [str(expected["per_class"]["ants"]["support"])]
    assert any(l.startswith("accuracy ") and l.split()[1] == f"{expected['accuracy']:.3f}" for l in lines)
    for name in ("confusion_matrix", "predictions", "most_wrong"):
        assert (outputs[-1].parent / f"{name}.png").is_file()


@pytest.mark.slow
def test_eval_refuses_a_folder_of_other_classes_in_one_line(tiny_checkpoint, tmp_path):
    other = make_image_folder(tmp_path / "wasps", classes={"wasps": (220, 200, 30), "flies": (20, 20, 20)}, per_class=2)
    result = run_train(f"ckpt_path={tiny_checkpoint}", f"data.root={other}", module="hymtl.eval", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: none of the classes of {other} (flies, wasps) is one of the model's (ants, bees)"


@pytest.mark.slow
def test_eval_scores_the_known_classes_of_a_folder_and_says_which_it_left_out(tiny_checkpoint, tmp_path):
    other = make_image_folder(tmp_path / "mixed", splits=("",), classes={"ants": (200, 40, 40), "wasps": (220, 200, 30)},
                              per_class=3)
    result = run_train(f"ckpt_path={tiny_checkpoint}", f"data.root={other}", "data.num_workers=0",
                       module="hymtl.eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 class folder of " in result.stdout + result.stderr and "unknown to the model left out (3 images): wasps" \
        in result.stdout + result.stderr
    assert "(split all, 3 images)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flat", "test_only", "val_only", "train_val_test"])
def test_eval_scores_every_image_of_a_held_out_folder_whatever_its_layout(tiny_checkpoint, tmp_path, layout):
    splits = {"flat": ("",), "test_only": ("test",), "val_only": ("val",), "train_val_test": ("train", "val", "test")}
    held_out = make_image_folder(tmp_path / "held_out", splits=splits[layout], per_class=5)
    result = run_train(f"ckpt_path={tiny_checkpoint}", f"data.root={held_out}", "data.num_workers=0",
                       module="hymtl.eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(_eval_outputs(tiny_checkpoint)[-1].read_text())
    assert report["split"] == "all" and report["num_images"] == 10 * len(splits[layout])


@pytest.mark.slow
def test_eval_needs_a_data_folder_when_the_checkpoint_has_no_run(tiny_checkpoint, tmp_path):
    lone = shutil.copy(tiny_checkpoint, tmp_path / "lone.ckpt")  # no .hydra/ beside it
    result = run_train(f"ckpt_path={lone}", module="hymtl.eval", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no data.root given")
    with pytest.raises(EvalError, match=r"no checkpoint given: python -m hymtl.eval ckpt_path=PATH"):
        evaluate(OmegaConf.create({"ckpt_path": None, "seed": 0}))


@pytest.mark.slow
def test_eval_without_data_root_finds_a_relative_root_from_another_folder(tiny_checkpoint, tmp_path):
    # a run launched from <launch>/ with data.root=images (relative), evaluated from elsewhere/
    launch = tmp_path / "launch"
    make_image_folder(launch / "images", per_class=2)
    run = launch / "outputs" / "day" / "time"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    ckpt = Path(shutil.copy(tiny_checkpoint, run / "checkpoints" / "last.ckpt"))
    (run / ".hydra" / "config.yaml").write_text("data:\n  root: images\n")
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {launch}\n")
    assert trained_data_root(ckpt) == launch / "images"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_train(f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "data.num_workers=0",
                       module="hymtl.eval", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next((run / "eval").glob("*/eval.json")).read_text())
    assert report["data_root"] == str((launch / "images").resolve()) and report["num_images"] > 0


def _eval_outputs(checkpoint) -> list[Path]:
    """Every eval.json written for ``checkpoint`` (its run's eval/ folder, or beside it)."""
    run = run_dir_of(checkpoint) or Path(checkpoint).resolve().parent
    return sorted((run / "eval").glob("*/eval.json"), key=lambda p: p.stat().st_mtime)


class _Payload:
    """Would create a file when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unusable_checkpoints_are_one_line_errors_and_never_run_code(tiny_checkpoint, tmp_path):
    with pytest.raises(EvalError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EvalError, match="cannot read checkpoint"):
        load_checkpoint(garbage)

    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(Path(tiny_checkpoint).read_bytes()[:5000])
    with pytest.raises(EvalError, match="cannot read checkpoint"):
        load_checkpoint(torn)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": _Payload(marker)}, f)
    with pytest.raises(EvalError, match="cannot read checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()

    model = load_checkpoint(tiny_checkpoint)
    assert model.class_names == ["ants", "bees"]

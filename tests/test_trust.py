"""Trust, second pass (issue 33): one file rule for every file hymtl opens, no stale feature
cache on a race, every stop non-zero with one line, descriptions checked against what a file
holds before anything is built.

Every case that would hang on a regression (a FIFO, /dev/zero, a symlink loop) runs under a
timeout, in a thread or a subprocess, so a regression fails instead of hanging the suite."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TESTS_DIR, entry_command, make_image

HANG_TIMEOUT = 60  # seconds: generous; a hang is what these tests catch, not slowness


def within(seconds: float, function, *args, **kwargs):
    """``function(*args, **kwargs)`` in a daemon thread; fails the test when it has not returned
    after ``seconds`` (a blocking open of a FIFO, an endless read) instead of hanging the suite."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} still running after {seconds}s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def entry(module: str, *args: str, cwd: Path = REPO_ROOT, env: dict | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command(module), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def _not_regular(tmp_path: Path, kind: str, name: str) -> Path:
    """A path named like a model file that is a FIFO or a symlink to /dev/zero."""
    path = tmp_path / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


# --------------------------------------------------------------------------- 1. stale features on a race
@pytest.fixture(scope="module")
def lite0():
    from hymtl.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("efficientnet_lite0", pretrained=False)


def test_a_file_rewritten_during_extraction_never_pairs_old_features_with_a_new_hash(lite0, tmp_path, monkeypatch):
    """The race made deterministic: the file is replaced right after the dataset read its bytes
    (where a second read for the hash used to happen later). The row stored must carry the
    digest of the bytes that were decoded, so the next run sees the file changed and recomputes."""
    import hymtl.data.images as images
    from hymtl.data.folders import Sample
    from hymtl.features import FeatureExtractor, MultiViewDataset

    first = make_image(tmp_path / "img" / "a.png", (200, 30, 30), size=(64, 64), fmt="PNG")
    old_bytes = first.read_bytes()
    replacement = make_image(tmp_path / "other.png", (20, 30, 220), size=(80, 48), fmt="PNG", seed=3)
    read_once = images.read_image_bytes
    swapped = []

    def read_then_swap(path):
        data = read_once(path)
        if not swapped:  # the writer of the race: the file changes as soon as it has been read
            os.replace(replacement, first)
            swapped.append(path)
        return data

    monkeypatch.setattr(images, "read_image_bytes", read_then_swap)
    samples = [Sample(str(first), 0)]
    extractor = FeatureExtractor(lite0.model, "efficientnet_lite0", cache_dir=tmp_path / "cache", batch_size=4)
    source = MultiViewDataset(samples, lite0.preprocessing)
    stale = extractor.extract(source).tensor
    assert swapped, "the hook did not run: the test would prove nothing"

    store = extractor.store(source.recipe)
    store.refresh()
    (row,) = store.rows(source.identity(0))
    assert row.meta["file_sha256"] == hashlib.sha256(old_bytes).hexdigest()  # the bytes that were decoded
    monkeypatch.setattr(images, "read_image_bytes", read_once)

    again = FeatureExtractor(lite0.model, "efficientnet_lite0", cache_dir=tmp_path / "cache", batch_size=4)
    fresh = again.extract(MultiViewDataset(samples, lite0.preprocessing)).tensor
    assert again.stats["hits"] == 0 and again.stats["computed"] == 1 and again.stats["corrupt"] == 1
    truth = FeatureExtractor(lite0.model, "efficientnet_lite0", cache_dir=False).extract(
        MultiViewDataset(samples, lite0.preprocessing)).tensor
    assert torch.equal(fresh, truth) and not torch.equal(stale, truth)


def test_an_image_is_read_once_and_decoded_from_those_bytes(tmp_path, monkeypatch):
    import hymtl.data.images as images
    from hymtl.data.folders import Sample
    from hymtl.backbones import Preprocessing
    from hymtl.features import MultiViewDataset

    path = make_image(tmp_path / "b.jpg", (10, 200, 10))
    reads = []
    read_once = images.read_image_bytes
    monkeypatch.setattr(images, "read_image_bytes", lambda p: reads.append(p) or read_once(p))
    views, digest = MultiViewDataset([Sample(str(path), 0)], Preprocessing(input_size=32, resize_size=36),
                                     num_views=2)[0]
    assert views.shape == (3, 3, 32, 32) and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert reads == [str(path)]
    assert images.decode_rgb_bytes(path.read_bytes()).size == images.load_rgb(path).size == (48, 40)


# --------------------------------------------------------------------------- 2. model files that are not regular files
MEMORY_CAP = 12 << 30  # address space of a guarded child: torch needs ~6 GB of it; /dev/zero would take all


def guarded_python(code: str, *args: str, timeout: float = HANG_TIMEOUT * 3) -> subprocess.CompletedProcess:
    """Run ``code`` in a child process with a timeout and a cap on its memory: a regression that
    blocks on a FIFO or reads /dev/zero without end fails the test instead of hanging the suite
    or taking the machine's memory (as a thread could not be stopped)."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    try:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout}s: it hangs")


LOADERS_SCRIPT = """
import sys
from pathlib import Path
from hymtl.inference import load_predictor
from hymtl.loading import LoadError, load_onnx, load_torchscript, read_sidecar
from hymtl.model import load_checkpoint
folder = Path(sys.argv[1])
for name, load in [("m.ckpt", load_checkpoint), ("m.onnx", load_onnx), ("m.pt", load_predictor),
                   ("x.ckpt", load_predictor), ("m.pt.json", read_sidecar),
                   ("t.pt", lambda p: load_torchscript(p, trust=True)), ("side.onnx", load_onnx)]:
    try:
        load(folder / name)
    except LoadError as exc:
        print("refused", name, "|", exc)
    else:
        print("loaded", name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_every_loader_refuses_a_model_file_that_is_not_a_regular_file(tiny_checkpoint, tmp_path, kind):
    """Checkpoints, ONNX, TorchScript (also through predict's format sniffing) and sidecars."""
    import shutil

    for name in ("m.ckpt", "m.onnx", "m.pt", "x.ckpt", "m.pt.json", "t.pt", "side.onnx.json"):
        _not_regular(tmp_path, kind, name)
    shutil.copy(tiny_checkpoint, tmp_path / kind / "side.onnx")  # a real file whose sidecar is not one
    result = guarded_python(LOADERS_SCRIPT, str(tmp_path / kind))
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 7, result.stderr[-3000:]
    for line in lines:
        assert line.startswith("refused") and "not a regular file" in line, line


def test_saved_run_config_that_is_a_fifo_is_no_config(tmp_path):
    from hymtl.runs import saved_config, trained_data_root

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    os.mkfifo(run / ".hydra" / "config.yaml")
    assert within(HANG_TIMEOUT, saved_config, run) is None
    assert within(HANG_TIMEOUT, trained_data_root, run / "checkpoints" / "best.ckpt") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_entry_points_refuse_a_model_path_that_is_not_a_regular_file(tiny_checkpoint, tmp_path, kind):
    """predict (which used to read /dev/zero until the kernel killed it), eval, export and resume:
    one error line, exit 2, within the timeout."""
    images = tiny_checkpoint.parent / "images" / "val"
    model = _not_regular(tmp_path, kind, "model.ckpt")
    runs = {
        "predict": entry("hymtl.predict", f"ckpt_path={model}", f"inputs=[{images}]", timeout=HANG_TIMEOUT * 3),
        "eval": entry("hymtl.eval", f"ckpt_path={model}", f"data.root={images.parent}",
                      f"hydra.run.dir={tmp_path / 'eval'}", timeout=HANG_TIMEOUT * 3),
        "export": entry("hymtl.export", f"ckpt_path={model}", f"out={tmp_path / 'm.onnx'}",
                        f"parity.inputs=[{images}]", timeout=HANG_TIMEOUT * 3),
        "resume": entry("hymtl.train", f"ckpt_path={model}", f"data.root={images.parent}", "model=efficientnet_lite0",
                        f"hydra.run.dir={tmp_path / 'train'}", timeout=HANG_TIMEOUT * 3),
    }
    for name, result in runs.items():
        line = one_error_line(result)
        assert "model.ckpt" in line and len(line) < 1000, (name, line)


# --------------------------------------------------------------------------- 3. every stop non-zero, with one line
def _signalled(module: str, patch: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run entry point ``module`` in a child whose ``patch`` (Python, run after the imports) makes
    the process send itself a signal at a chosen phase: the stop is deterministic."""
    code = "\n".join([
        "import os, signal, sys",
        f"sys.argv = ['{module}', *{args!r}]",
        patch,
        f"from {module} import main",
        "main()",
    ])
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def _stop_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {'SIGINT' if code == 130 else 'SIGTERM'} during "), last
    return last


@pytest.mark.slow
def test_eval_stopped_by_sigterm_exits_143_and_says_nothing_was_written(tiny_checkpoint, tmp_path):
    patch = ("import hymtl.callbacks as c\n"
             "_start = c.ClassificationReport.on_test_batch_start\n"
             "def start(self, *a, **k):\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "    return _start(self, *a, **k)\n"
             "c.ClassificationReport.on_test_batch_start = start")
    out = tmp_path / "eval"
    result = _signalled("hymtl.eval", patch, [f"ckpt_path={tiny_checkpoint}", f"data.root={tiny_checkpoint.parent / 'images'}",
                                              "data.num_workers=0", f"hydra.run.dir={out}"], tmp_path)
    assert "no eval.json was written" in _stop_line(result, 143)
    assert not (out / "eval.json").exists()


@pytest.mark.slow
def test_predict_stopped_by_ctrl_c_exits_130_without_a_traceback(tiny_checkpoint, tmp_path):
    patch = ("import hymtl.inference as inf\n"
             "_predict = inf.predict\n"
             "def predict(*a, **k):\n"
             "    os.kill(os.getpid(), signal.SIGINT)\n"
             "    return _predict(*a, **k)\n"
             "inf.predict = predict")
    out = tmp_path / "predictions.csv"
    result = _signalled("hymtl.predict", patch, [f"ckpt_path={tiny_checkpoint}", "num_workers=0", "format=csv",
                                                 f"inputs=[{tiny_checkpoint.parent / 'images' / 'val'}]", f"out={out}"],
                        tmp_path)
    assert "no predictions were written" in _stop_line(result, 130)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_export_stopped_during_parity_leaves_no_file_and_no_scratch_folder(tiny_checkpoint, tmp_path, signum):
    patch = ("import hymtl.exporting as e\n"
             "_check = e.check_parity\n"
             "def check(*a, **k):\n"
             f"    os.kill(os.getpid(), {int(signum)})\n"
             "    return _check(*a, **k)\n"
             "e.check_parity = check")
    out = tmp_path / "m.pt"
    result = _signalled("hymtl.export", patch, [f"ckpt_path={tiny_checkpoint}", "format=torchscript", f"out={out}",
                                                "parity.num_workers=0",
                                                f"parity.inputs=[{tiny_checkpoint.parent / 'images' / 'val'}]"], tmp_path)
    assert "no model file or sidecar was written" in _stop_line(result, 128 + signum)
    assert not out.exists() and not list(tmp_path.glob("m.pt*"))
    assert not list((tmp_path / "tmp").iterdir())  # the scratch folder of the parity phase is gone


# --------------------------------------------------------------------------- 4. the feature cache folder
CACHE_FIFO_SCRIPT = """
import json, logging, os, sys, torch
from pathlib import Path
from hymtl.backbones import create_backbone
from hymtl.data.folders import Sample
from hymtl.features import FeatureExtractor, MultiViewDataset
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Catch(logging.WARNING))
torch.manual_seed(0)
lite0 = create_backbone("efficientnet_lite0", pretrained=False)
samples = [Sample(p, 0) for p in sys.argv[2:]]
source = MultiViewDataset(samples, lite0.preprocessing)
extractor = FeatureExtractor(lite0.model, "efficientnet_lite0", cache_dir=sys.argv[1], batch_size=4)
folder = extractor.store(source.recipe).folder
folder.mkdir(parents=True)
os.mkfifo(folder / "00000000000000000001-1-abcd.safetensors")
(folder / "00000000000000000002-1-abcd.safetensors").symlink_to("/dev/zero")
first, second = extractor.extract(source), extractor.extract(source)
print(json.dumps({"indices": first.indices, "same": torch.equal(first.tensor, second.tensor),
                  "stats": extractor.stats, "kept": (folder / "00000000000000000001-1-abcd.safetensors").exists(),
                  "warned": sum("not a regular file" in w for w in warnings)}))
"""


@pytest.mark.slow
def test_a_fifo_named_like_a_shard_is_a_damaged_entry_warned_once_and_recomputed(tmp_path):
    """In a child process: the blocked open of a FIFO inside safetensors holds the interpreter
    (deaf to signals, a thread timeout never fires); only a process can be stopped."""
    images = [str(make_image(tmp_path / "img" / f"{i}.jpg", (40 * i, 90, 10))) for i in range(2)]
    result = guarded_python(CACHE_FIFO_SCRIPT, str(tmp_path / "cache"), *images)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["indices"] == [0, 1] and outcome["same"]
    assert outcome["stats"]["computed"] == 2 and outcome["stats"]["hits"] == 2
    assert outcome["warned"] == 2  # one per damaged entry, once
    assert outcome["kept"]  # not ours to remove


# --------------------------------------------------------------------------- 5. globs over symlink loops
def test_a_recursive_glob_over_symlink_loops_ends_and_gives_each_file_once(tmp_path):
    from hymtl.inference import collect_inputs

    folder = tmp_path / "shots"
    files = [make_image(folder / name, (90, 90, 200)) for name in ("a.jpg", "b.jpg", "sub/c.jpg", "sub/deeper/d.jpg")]
    (folder / "here").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")
    (folder / "sub" / "deeper" / "top").symlink_to(folder)
    code = ("import json, sys\nfrom hymtl.inference import collect_inputs\n"
            "paths, skipped = collect_inputs([sys.argv[1]])\nprint(json.dumps([paths, len(skipped)]))")
    result = guarded_python(code, f"{folder}/**/*.jpg")  # a child: an endless walk cannot outlive the test
    assert result.returncode == 0, result.stderr[-3000:]
    paths, skipped = json.loads(result.stdout.splitlines()[-1])
    assert sorted(os.path.realpath(p) for p in paths) == sorted(str(f.resolve()) for f in files)
    assert len(paths) == 4 and not skipped
    # training's walking rules: the same four files a folder input gives
    assert sorted(collect_inputs([str(folder)])[0]) == sorted(paths)


# --------------------------------------------------------------------------- 6. descriptions against what a file holds
def _variant(tiny_checkpoint: Path, dest: Path, change) -> Path:
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, dest)
    return dest


def _million_classes(checkpoint: dict) -> None:
    names = [f"class{i}" for i in range(10**6)]
    checkpoint["hyper_parameters"].update(num_classes=len(names), class_names=names)


def _nan_head(checkpoint: dict) -> None:
    weight = checkpoint["state_dict"]["head.1.weight"]
    weight[0, 0] = float("nan")


@pytest.mark.slow
def test_a_checkpoint_claiming_a_million_classes_is_refused_before_anything_is_built(tiny_checkpoint, tmp_path):
    from hymtl.loading import LoadError
    from hymtl.model import load_checkpoint

    path = _variant(tiny_checkpoint, tmp_path / "million.ckpt", _million_classes)
    with pytest.raises(LoadError, match=r"weights do not fit its efficientnet_lite0 model as described \(head.1.weight "
                                        r"holds \(2, 1280\) where its description \(efficientnet_lite0, 1000000 classes\)"
                                        r" needs \(1000000, 1280\)") as refused:
        load_checkpoint(path)
    assert len(str(refused.value)) < 1000
    def peak_mb(checkpoint: Path) -> tuple[float, str]:  # tests/peak_load.py, in a process of its own
        result = subprocess.run([*entry_command("peak_load"), str(checkpoint)], capture_output=True, text=True,
                                timeout=600, cwd=TESTS_DIR, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])})
        return float(result.stdout.split("peak_mb")[-1]), result.stdout

    refused_mb, output = peak_mb(path)
    normal_mb, _ = peak_mb(tiny_checkpoint)  # the baseline, in the same run: loading the honest checkpoint
    # what a normal checkpoint needs (1.5 GB, or the baseline of this machine if more); GBs before the fix
    assert refused_mb < max(1536, 1.25 * normal_mb), (output, normal_mb)


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (_million_classes, "weights do not fit its efficientnet_lite0 model as described"),
    (_nan_head, r"is damaged: non-finite weights in 1 tensors \(e.g. head.1.weight\)"),
])
def test_resume_names_a_damaged_checkpoint_in_one_short_line(tiny_checkpoint, tmp_path, change, message):
    import re

    path = _variant(tiny_checkpoint, tmp_path / "damaged.ckpt", change)
    result = entry("hymtl.train", f"ckpt_path={path}", f"data.root={tiny_checkpoint.parent / 'images'}",
                   "model=efficientnet_lite0", f"hydra.run.dir={tmp_path / 'run'}", timeout=HANG_TIMEOUT * 5)
    line = one_error_line(result)
    assert re.search(message, line) and len(line) < 1000 and "learning rate" not in line, line


def _hostile_onnx(path: Path, side: int = 40000) -> Path:
    """A valid little classifier whose graph also makes a ``side``² tensor from constants."""
    import onnx
    from onnx import TensorProto, helper

    from hymtl.backbones import Preprocessing
    from hymtl.loading import ONNX_METADATA_KEY, export_metadata

    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [side, side])),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["scores", "total"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, 0.0, 0.0, 1.0, 0.5, 0.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = export_metadata(["ants", "bees"], Preprocessing(), "onnx")
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(meta)})
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def test_an_onnx_graph_that_declares_a_huge_tensor_is_refused_before_it_runs(tmp_path):
    from hymtl.loading import LoadError, load_onnx

    with pytest.raises(LoadError, match=r"tensor big declares 1,600,000,000 elements per image"):
        load_onnx(_hostile_onnx(tmp_path / "big.onnx"))
    session, meta = load_onnx(_hostile_onnx(tmp_path / "small.onnx", side=4))  # the same graph, harmless size
    assert meta["class_names"] == ["ants", "bees"]


# --------------------------------------------------------------------------- also
def test_a_saved_config_is_read_as_data_not_resolved(tmp_path, monkeypatch):
    from hymtl.runs import saved_config, trained_data_root

    monkeypatch.setenv("HYMTL_TEST_SECRET", "s3cr3t-value")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    planted = tmp_path / "planted"
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  root: ${oc.env:HYMTL_TEST_SECRET}\n"
        f"paths:\n  out: ${{hymtl_run_dir:{planted}/x,RUN}}\n  log: ${{data.seed}}\n"
        "  data: ${data.root}\n"
        "model:\n  backbone: efficientnet_lite0\n"
    )
    (run / ".hydra" / "data").mkdir()
    config = saved_config(run)
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(config)
    assert "s3cr3t" not in text and OmegaConf.select(config, "model.backbone") == "efficientnet_lite0"
    assert OmegaConf.is_missing(config.data, "root") and OmegaConf.is_missing(config.paths, "out")
    assert trained_data_root(run / "checkpoints" / "best.ckpt") is None
    for key in ("paths.out", "paths.data", "data.root"):
        try:
            OmegaConf.select(config, key, throw_on_missing=True)
        except Exception as exc:  # noqa: BLE001 - missing is fine; the secret must not be in it
            assert "s3cr3t" not in str(exc)
    assert not planted.exists()


def test_a_write_that_fails_in_a_folder_turned_read_only_leaves_no_data_and_no_cleanup_traceback(tmp_path, monkeypatch):
    """Simulated, because tests run as root (a chmod does not stop root): the rename and the
    removal of the temporary file both fail as they do in a folder made read-only mid-write."""
    from hymtl.errors import WriteError
    from hymtl.fileio import atomic_write_bytes

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(WriteError, match=r"cannot write .*last\.ckpt: Read-only file system \(its temporary file .* "
                                         r"could not be removed; it was emptied\)"):
        atomic_write_bytes(tmp_path / "last.ckpt", b"x" * 100_000)
    monkeypatch.undo()
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert [p.stat().st_size for p in leftovers] == [0]


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_exits_non_zero_after_every_job_ran(tmp_path):
    result = entry("hymtl.train", "-m", f"data.root={tmp_path / 'missing1'},{tmp_path / 'missing2'}",
                   "model=efficientnet_lite0", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=HANG_TIMEOUT * 5)
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/error.json"))) == 2  # the second job ran after the first failed
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 jobs of the sweep failed")


@pytest.mark.parametrize("unfreeze, stages", [(0, 1), (None, None)], ids=["partial", "frozen"])
def test_a_learning_rate_too_large_for_float32_is_one_line_before_training(unfreeze, stages):
    """``mode.lr=1e308``: a traceback from torch's SGD in mode=partial on 146bb97; one line now."""
    from hymtl.errors import HymtlError
    from hymtl.model import TransferModule

    with pytest.raises(HymtlError, match=r"learning rate lr \* (backbone|head)_lr_mult = .* is too large for float32"):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, lr=1e308, unfreeze_at_epoch=unfreeze,
                       trainable_stages=stages)

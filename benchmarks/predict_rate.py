"""Prediction rate: ``hymtl.predict`` (PyTorch and ONNX Runtime backends) against the floor.

    .venv/bin/python benchmarks/predict_rate.py --images ../shared/data/hymenoptera_data/val -n 600

Rows (images/s, and the ratio to forward-only at the same precision):

* decode-only: :func:`hymtl.inference.iter_batches` (the DataLoader pipeline ``hymtl.predict``
  uses: same dataset, transforms, batch size and workers), no model;
* forward-only: the same model on the pre-decoded batches, channels-last, fp32 and bf16 autocast
  (one untimed warm-up batch first), as trained (the reference of the ratios) and simplified for
  inference (batch norms folded, static paddings: what :class:`~hymtl.inference.TorchPredictor`
  runs; a second ratio column);
* ``hymtl.predict`` PyTorch backend, ``precision=auto`` and ``precision=32``;
* ``hymtl.predict`` ONNX backend: the same checkpoint exported by ``hymtl.export`` (in-process).

The predict rows run :func:`hymtl.predict.run` in-process with the config composed from
``conf/predict.yaml`` (Hydra's compose API, ``out=`` a scratch file) and report the rate it
prints (decoding included, model loading and the file check excluded). The model is an
untrained ``efficientnet_lite0`` :class:`~hymtl.model.TransferModule` saved after one Lightning
training step (the speed does not depend on the weights). ``--images`` is cycled to ``-n``
distinct files (copies in a scratch folder: ``hymtl.predict`` drops duplicate paths); without it,
JPEGs of ``--size`` are generated. ``--quick`` is a smoke run (64 images): not the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(folder: Path, n: int, source: str | None, size: int) -> list[str]:
    """``n`` distinct image files in ``folder``: ``source``'s images cycled, or generated JPEGs."""
    from PIL import Image

    from hymtl.data.folders import walk_images

    folder.mkdir(parents=True)
    if source:
        found = sorted(walk_images(source))
        if not found:
            sys.exit(f"error: no images in {source}")
        paths = []
        for i in range(n):
            src = found[i % len(found)]
            dst = folder / f"{i:05d}_{Path(src).name}"
            shutil.copyfile(src, dst)
            paths.append(str(dst))
        return paths
    rng = random.Random(0)
    paths = []
    for i in range(n):
        img = Image.effect_noise((size, size), 64).convert("RGB")
        img = Image.blend(img, Image.new("RGB", img.size, tuple(rng.randrange(256) for _ in range(3))), 0.5)
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def make_checkpoint(folder: Path) -> Path:
    """An untrained efficientnet_lite0 TransferModule after one Lightning training step."""
    import lightning.pytorch as pl

    from hymtl.data import ImageFolderDataModule
    from hymtl.model import TransferModule

    for split in ("train", "val"):
        for name, color in (("ants", (200, 40, 40)), ("bees", (40, 40, 200))):
            for i in range(2):
                path = folder / "data" / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.new("RGB", (64, 48), color).save(path)
    datamodule = ImageFolderDataModule(root=str(folder / "data"), batch_size=2, num_workers=0)
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2,
                           class_names=datamodule.class_names, unfreeze_at_epoch=None)
    datamodule.preprocessing = model.preprocessing
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=datamodule)
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hymtl.runtime import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def predict_rate(model_path: Path, folder: Path, out: Path, args, precision: str | None = None) -> tuple[float, str]:
    """``hymtl.predict.run`` in-process: its rate (images/s) and the precision it ran."""
    from hymtl.predict import run

    overrides = [f"ckpt_path={model_path}", f"inputs=[{folder}]", f"out={out}", f"batch_size={args.batch_size}",
                 f"num_workers={args.num_workers}"] + ([f"precision={precision}"] if precision else [])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        result = run(compose("predict", overrides))
    line = stderr.getvalue().strip().splitlines()[-1]
    return result.images_per_sec, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="folder of images, cycled to -n files (default: generated JPEGs)")
    parser.add_argument("-n", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--size", type=int, default=320, help="side of generated JPEGs (default 320)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 images (not the benchmark)")
    args = parser.parse_args()
    if args.quick:
        args.n = min(args.n, 64)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    import torch

    from hymtl.export import export
    from hymtl.inference import TorchPredictor, iter_batches, native_bf16
    from hymtl.model import load_checkpoint

    rows: list[tuple[str, float, str, str]] = []  # name, images/s, precision, note
    with tempfile.TemporaryDirectory(prefix="hymtl-predict-rate.") as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.n, args.images, args.size)
        ckpt = make_checkpoint(tmp / "ckpt")
        model = load_checkpoint(ckpt)
        pre = model.preprocessing

        started = time.perf_counter()
        batches = [b for _, b, _ in iter_batches(paths, pre, args.batch_size, args.num_workers) if b is not None]
        rows.append(("decode-only (iter_batches, no model)", args.n / (time.perf_counter() - started), "-", ""))

        forward: dict[str, float] = {}  # the module as trained: the "forward-only" reference
        simplified: dict[str, float] = {}  # what the predictor runs (simplify_for_inference)
        for simplify, rates in ((False, forward), (True, simplified)):
            for precision in ("32", "bf16"):
                predictor = TorchPredictor(load_checkpoint(ckpt), precision=precision, simplify=simplify)
                predictor.logits(batches[0])  # warm-up: oneDNN builds its kernels for this shape
                started = time.perf_counter()
                for batch in batches:
                    predictor.logits(batch)
                rates[precision] = args.n / (time.perf_counter() - started)
                what = str(predictor.simplified) if simplify else "the module as trained"
                rows.append((f"forward-only ({what}, pre-decoded, channels-last, "
                             f"{'fp32' if precision == '32' else 'bf16'})", rates[precision], precision, ""))

        out = tmp / "predictions.txt"
        for precision in ("auto", "32"):
            rate, line = predict_rate(ckpt, tmp / "images", out, args, precision)
            ran = "bf16" if " bf16," in line else "32"
            rows.append((f"hymtl.predict PyTorch (precision={precision})", rate, ran, line))

        onnx = tmp / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            export(compose("export", [f"ckpt_path={ckpt}", f"out={onnx}", f"parity.inputs=[{tmp / 'images'}]",
                                      "parity.max_images=8", "parity.num_workers=0"]))
        rate, line = predict_rate(onnx, tmp / "images", out, args)
        rows.append(("hymtl.predict ONNX Runtime (same checkpoint, hymtl.export)", rate, "32", line))

    print()
    print(f"{args.n} images ({args.images or f'generated {args.size}x{args.size} JPEGs'}), batch {args.batch_size}, "
          f"num_workers={args.num_workers}, torch threads {torch.get_num_threads()}, native bf16: {native_bf16()}")
    print()
    print("| row | images/s | x forward-only as trained (same precision) | x forward-only simplified |")
    print("|---|---:|---:|---:|")
    for name, rate, precision, _ in rows:
        ratios = [f"{rate / rates[precision]:.2f}" if precision in rates else "-" for rates in (forward, simplified)]
        print(f"| {name} | {rate:.1f} | {' | '.join(ratios)} |")
    print()
    for name, _, _, line in rows:
        if line:
            print(f"{name}: {line}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.quick:
        print("(--quick: a smoke run, not the benchmark)")


if __name__ == "__main__":
    main()

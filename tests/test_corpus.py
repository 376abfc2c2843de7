"""The model corpus: every small model runs on 3x32x32 inputs, traces with torch.fx, and keeps its public
reference's state_dict layout; the full-size models have their references' parameter counts."""

import pytest
import torch
from torch import nn

from securemark.corpus import CORPUS, SMALL, build
from securemark.corpus.mobilenet import mobilenet_v2
from securemark.corpus.resnet import resnet18
from securemark.corpus.vgg import vgg11_bn
from securemark.corpus.vit import vit_tiny

NAMES = sorted(CORPUS)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_small_is_given_for_every_model():
    assert set(SMALL) == set(CORPUS) == {
        "resnet18", "resnet8", "cifar-resnet18", "preact-resnet18", "vgg11-bn", "mobilenet-v2", "vit-tiny",
        "flower-net",
    }  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_small_model_runs(name):
    torch.manual_seed(0)
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_small_model_trains(name):
    model = build(name).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_small_model_is_fx_traceable(name):
    model = build(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_resnet18_keys():
    sd = build("resnet18").state_dict()
    assert "layer1.0.downsample.0.weight" not in sd
    assert "layer2.0.downsample.1.running_mean" in sd
    assert {"conv1.weight", "bn1.num_batches_tracked", "layer4.1.bn2.bias", "fc.weight"} <= set(sd)
    assert sd["conv1.weight"].shape == (16, 3, 7, 7)
    assert sd["fc.weight"].shape == (10, 128)


def test_resnet8_has_three_stages():
    sd = build("resnet8").state_dict()
    assert "layer3.0.downsample.0.weight" in sd and "layer3.1.conv1.weight" not in sd
    assert not any(k.startswith("layer4.") for k in sd)
    assert sd["fc.weight"].shape == (10, 64)


def test_cifar_resnet18_keys():
    sd = build("cifar-resnet18").state_dict()
    assert {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var", "linear.weight"} <= set(sd)
    assert not any(k.startswith("layer1.0.shortcut") for k in sd)  # empty nn.Sequential
    assert sd["conv1.weight"].shape == (8, 3, 3, 3)
    assert "fc.weight" not in sd


def test_preact_resnet18_keys():
    sd = build("preact-resnet18").state_dict()
    assert {"layer1.0.bn1.running_mean", "layer2.0.shortcut.0.weight", "bn.running_var", "linear.weight"} <= set(sd)
    assert "layer2.0.shortcut.1.weight" not in sd and "bn1.weight" not in sd  # no BatchNorm on the shortcut, stem


def test_vgg11_bn_keys():
    sd = build("vgg11-bn").state_dict()
    assert {"features.0.weight", "features.1.running_mean", "classifier.0.weight", "classifier.6.weight"} <= set(sd)
    assert sd["classifier.0.weight"].shape == (64, 64 * 7 * 7)
    assert sd["classifier.6.weight"].shape == (10, 64)


def test_mobilenet_v2_keys():
    sd = build("mobilenet-v2").state_dict()
    assert {"features.0.0.weight", "features.0.1.running_mean", "classifier.1.weight"} <= set(sd)
    assert sd["features.1.conv.0.0.weight"].shape[1] == 1  # first block: t=1, so conv.0 is the depthwise conv
    assert sd["features.2.conv.1.0.weight"].shape[1] == 1  # later blocks: conv.0 expands, conv.1 is depthwise
    assert sd["features.2.conv.3.running_var"].ndim == 1  # project conv (2), then its BatchNorm (3)
    assert sd["features.18.0.weight"].shape[0] == 128  # last 1x1 ConvBNReLU to last_channel


def test_mobilenet_v2_shorter_setting():
    model = build("mobilenet-v2", setting=[[1, 16, 1, 1], [6, 24, 2, 2]])
    assert len(model.features) == 1 + 3 + 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vit_tiny_keys():
    sd = build("vit-tiny").state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 32, 32)
    assert sd["cls_token"].shape == (1, 1, 32)
    assert sd["pos_embed"].shape == (1, (32 // 8) ** 2 + 1, 32)
    assert {"patch_embed.proj.weight", "blocks.1.mlp.fc2.bias", "blocks.1.norm2.weight", "norm.weight"} <= set(sd)
    assert sd["head.weight"].shape == (10, 32)


def test_flower_net_keys():
    sd = build("flower-net").state_dict()
    assert set(sd) == {f"{m}.{p}" for m in ("conv1", "conv2", "fc1", "fc2", "fc3") for p in ("weight", "bias")}
    assert sd["fc3.weight"].shape == (10, 84)
    assert _params(build("flower-net")) == 62_006


def test_resnet18_parameter_counts():
    assert _params(resnet18()) == 11_181_642
    assert _params(resnet18(num_classes=1000)) == 11_689_512  # torchvision.models.resnet18()


def test_reference_sizes_match_their_references():
    with torch.device("meta"):  # counts only: nothing allocated
        assert _params(vgg11_bn(num_classes=1000)) == 132_868_840  # torchvision.models.vgg11_bn()
        assert _params(mobilenet_v2(num_classes=1000)) == 3_504_872  # torchvision.models.mobilenet_v2()
        assert _params(vit_tiny(num_classes=1000, img_size=224, patch=16)) == 5_717_416  # timm vit_tiny_patch16_224


def test_overrides_and_unknown_name():
    assert build("resnet18", width=8).fc.in_features == 64
    assert build("vgg11-bn", num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="resnet18"):
        build("resnet-50")

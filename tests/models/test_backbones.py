import pytest
import torch
from torchvision import models

from siamkit.errors import SiamkitError
from siamkit.models import backbones
from siamkit.models.backbones import build_backbone


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("mobilenet_v3_small", 576)])
def test_backbones_return_features(name, width):
    model, w = build_backbone(name)
    assert w == width
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, width)


def test_local_weights_load_and_ignore_the_classifier(tmp_path):
    ref = models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")  # a torchvision-format file, fc.* included
    model, _ = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def test_local_weights_of_another_model_are_refused(tmp_path):
    torch.save(models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(SiamkitError, match="does not fit this backbone"):
        build_backbone("resnet18", pretrained=str(tmp_path / "r34.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SiamkitError, match="not a readable"):
        build_backbone("resnet18", pretrained=str(tmp_path / "junk.pth"))


def test_imagenet_offline_fails_with_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    # torchvision downloads through torch.hub; make that fail the way it does offline.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(SiamkitError, match="could not download torchvision's ImageNet weights.*--pretrained PATH"):
        backbones.build_backbone("resnet18", pretrained="imagenet")


def test_greyscale_first_conv_sums_rgb_weights(tmp_path):
    ref = models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model, _ = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"), in_channels=1)
    assert model.conv1.in_channels == 1
    torch.testing.assert_close(model.conv1.weight, ref.conv1.weight.sum(dim=1, keepdim=True))


def test_pretrained_from_a_siamkit_run_loads_its_backbone_and_fresh_heads(tmp_path):
    from siamkit.checkpoint import load_checkpoint
    from siamkit.errors import SiamkitError
    from siamkit.models.siamese import ModelSpec, SiameseNet
    from siamkit.train.loop import train
    from tiny_run import tiny_config

    run = tmp_path / "pretrain"
    train(tiny_config(run, steps=2, embedding_dim=16), progress=False)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    spec = ModelSpec(backbone="mobilenet_v3_small", embedding_dim=16, n_classes=5)
    torch.manual_seed(3)
    tuned = SiameseNet(spec, str(run))
    torch.manual_seed(3)
    scratch = SiameseNet(spec)
    for key, value in tuned.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, saved["model"][key]), key  # the run's backbone, bit for bit
        else:
            assert torch.equal(value, scratch.state_dict()[key]), key  # heads as a fresh model draws them
    assert not torch.equal(tuned.embedding.fc.weight, saved["model"]["embedding.fc.weight"])
    # A checkpoint file works the same as its run folder.
    same = SiameseNet(spec, str(run / "checkpoints" / "last.pt"))
    assert torch.equal(same.backbone.features[0][0].weight, tuned.backbone.features[0][0].weight)
    with pytest.raises(SiamkitError) as info:
        SiameseNet(ModelSpec(backbone="resnet18"), str(run))
    assert str(info.value) == (
        f"--pretrained {run} is a siamkit run of --backbone mobilenet_v3_small on 3 channel(s); this run builds "
        f"resnet18 on 3: pass --backbone mobilenet_v3_small"
    )


@pytest.mark.parametrize("name, width, features", [
    ("resnet18-small", 64, 512), ("resnet18-small-w16", 16, 128),
    ("resnet18-small-w16-flat", 16, 128 * 4 * 4),  # layer4's 4x4 map flattened instead of averaged
])
def test_small_input_stem_keeps_the_resolution_into_layer1(name, width, features):
    model, width_reported = build_backbone(name, in_channels=1)
    assert width_reported == features
    x = torch.randn(2, 1, 32, 32)
    seen = {}
    for stage in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, stage=stage: seen.__setitem__(stage, tuple(o.shape)))
    assert model(x).shape == (2, features)
    # 3x3 stride-1 stem, no max-pool: 32x32 into layer1; layer4 ends on 4x4 (torchvision's stem: 1x1)
    assert seen == {
        "conv1": (2, width, 32, 32), "maxpool": (2, width, 32, 32), "layer1": (2, width, 32, 32),
        "layer2": (2, 2 * width, 16, 16), "layer3": (2, 4 * width, 8, 8), "layer4": (2, 8 * width, 4, 4),
    }
    with pytest.raises(SiamkitError, match="has no ImageNet weights"):
        build_backbone(name, pretrained="imagenet")


@pytest.mark.parametrize("name, width", [("resnet18-small-w16-flat-s2", 16), ("resnet18-small-w24-flat", 24),
                                         ("resnet18-small-w32-flat", 32)])
def test_small_input_variants_stage_shapes(name, width):
    """-s2: a stride-2 3x3 stem, so a 64x64 input runs layer1 at 32x32, as the stride-1 stem does at 32x32."""
    model, features = build_backbone(name, in_channels=1)
    size, first = (64, 32) if name.endswith("-s2") else (32, 32)
    seen = {}
    for stage in ("conv1", "layer1", "layer4"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, stage=stage: seen.__setitem__(stage, tuple(o.shape)))
    assert features == 8 * width * 4 * 4
    assert model(torch.randn(2, 1, size, size)).shape == (2, features)
    assert seen == {"conv1": (2, width, first, first), "layer1": (2, width, first, first),
                    "layer4": (2, 8 * width, first // 8, first // 8)}


def test_flat_map_features_are_the_normalised_final_map_in_order():
    """In eval mode (no dropout) the flat features are layer4's map through its BatchNorm, flattened channel-major."""
    model, _ = build_backbone("resnet18-small-w16-flat", in_channels=1)
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    trunk = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                model.layer1, model.layer2, model.layer3, model.layer4)
    bn = model.avgpool[1]
    by_hand = ((trunk(x) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
               * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).reshape(3, -1)
    # float32, same operations up to BatchNorm's fused form: agreement to a few ulps of values of order 1
    torch.testing.assert_close(model(x), by_hand, rtol=1e-5, atol=1e-5)


def test_dlib_backbone_with_dlibs_weights_and_its_stages():
    from siamkit.models.dlib_weights import load_dlib_state_dict
    from siamkit.models.siamese import ModelSpec, SiameseNet

    model, width = build_backbone("dlib-resnet29", pretrained="dlib")
    assert width == 256
    dlib_state = load_dlib_state_dict()
    assert all(torch.equal(v, dlib_state[k]) for k, v in model.state_dict().items())  # every tensor is dlib's
    assert model(torch.zeros(1, 3, 150, 150)).shape == (1, 256)
    with pytest.raises(SiamkitError, match="drop --backbone resnet18"):
        build_backbone("resnet18", pretrained="dlib")
    net = SiameseNet(ModelSpec(backbone="dlib-resnet29", freeze_until="layer3"))
    frozen = {name.split(".")[1] for name, p in net.backbone.named_parameters(prefix="backbone") if not p.requires_grad}
    assert frozen == {"stem", "layer1", "layer2", "layer3"}

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

"""The recipe resolved in one place (config.recipe_for): --pretrained dlib's recipe, each value overridable, and
the one-line refusals of options that do not fit dlib's network."""
from __future__ import annotations

import pytest

from siamkit.cli import parse_args
from siamkit.config import RECIPES, TrainConfig, recipe_for
from siamkit.errors import SiamkitError


def config_of(*argv: str) -> TrainConfig:
    return TrainConfig.from_dict(vars(parse_args(["train", *argv])))


def test_pretrained_dlib_picks_its_recipe():
    assert recipe_for("auto", "att", "dlib") is RECIPES["dlib-finetune"]
    assert recipe_for("auto", "att", "none") is RECIPES["faces"]
    assert recipe_for("auto", "digits", "none") is RECIPES["none"]
    assert recipe_for("faces", "att", "dlib") is RECIPES["faces"]  # --recipe NAME wins over auto
    cfg = config_of("--pretrained", "dlib", "--data", "att")
    assert (cfg.backbone, cfg.freeze_until, cfg.pretrained_head, cfg.lr) == ("dlib-resnet29", "layer3", "keep", 1e-4)
    cfg.validate()


def test_every_recipe_value_can_be_overridden():
    cfg = config_of("--pretrained", "dlib", "--data", "att", "--lr", "3e-4", "--freeze-until", "layer4",
                    "--pretrained-head", "fresh", "--steps", "50", "--classifier", "arcface")
    assert (cfg.lr, cfg.freeze_until, cfg.pretrained_head, cfg.steps, cfg.classifier) == (
        3e-4, "layer4", "fresh", 50, "arcface")
    cfg.validate()


@pytest.mark.parametrize("argv, message", [
    (("--backbone", "resnet18"), "drop --backbone resnet18"),
    (("--image-size", "112", "112"), "150x150 RGB"),
    (("--grayscale",), "150x150 RGB"),
    (("--embedding-dim", "64"), "--embedding-dim 128"),
])
def test_options_that_do_not_fit_dlib_are_refused(argv, message):
    with pytest.raises(SiamkitError, match=message):
        config_of("--pretrained", "dlib", "--data", "att", *argv).validate()


def test_keeping_dlibs_head_needs_dlib():
    with pytest.raises(SiamkitError, match="--pretrained-head keep"):
        config_of("--data", "att", "--pretrained-head", "keep").validate()


def test_freeze_stages_include_dlibs():
    from siamkit.models.backbones import FREEZE_STAGES

    assert {"stem", "layer1", "layer2", "layer3", "layer4", "layer5"} <= set(FREEZE_STAGES)

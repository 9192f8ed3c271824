"""The recipe resolved in one place (config.recipe_for, TrainConfig.for_data): --pretrained dlib's recipe, each value
overridable, the one-line refusals of options that do not fit dlib's network, and `siamkit train --help` showing
the defaults that a run writes into its config.json."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from siamkit.cli import main, parse_args
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
    assert (cfg.backbone, cfg.freeze_until, cfg.pretrained_head, cfg.lr) == ("dlib-resnet29", "layer4", "keep", 1e-5)
    assert (cfg.embedding_activation, cfg.loss, cfg.classification_weight) == ("none", "triplet", 0.0)
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
    from siamkit.models.backbones import freeze_stages

    assert {"stem", "layer1", "layer2", "layer3", "layer4", "layer5"} <= set(freeze_stages())


# ---------------------------------------------------------------- one set of defaults: --help shows what runs


def help_defaults(capsys, *argv: str) -> dict[str, str]:
    """{--flag: V} from the "(default: V)" that ends each option's help in `siamkit train ARGV --help`."""
    with pytest.raises(SystemExit):
        parse_args(["train", *argv, "--help"])
    text = capsys.readouterr().out
    options = "\n".join(line for line in text.split("\noptions:\n", 1)[1].splitlines() if line.startswith(" "))
    blocks = re.split(r"\n(?=  -)", options)  # one block per option; group titles left out
    found = {}
    for block in blocks:
        flat = " ".join(block.split())
        if flat.startswith("-h"):
            continue
        match = re.search(r"\(default: ([^()]*)\)$", flat)
        assert match, f"no (default: V) at the end of: {flat}"
        assert flat.count("(default:") == 1, f"more than one default in: {flat}"
        found[flat.split()[0].rstrip(",")] = match.group(1)
    return found


def shown(flag: str, value) -> str:
    """How --help writes a config value (independently of siamkit's formatter)."""
    if flag.startswith("--no-"):  # a flag of its own: whether it is given
        return "off" if value else "on"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value) if value != "" else "none"  # an empty text option (--face-augment) reads as none


def help_matches_run(capsys, tmp_path, data: str, overrides: dict[str, str]) -> None:
    defaults = help_defaults(capsys, "--data", data)
    run = tmp_path / "run"
    argv = ["train", "--data", data, "--out", str(run), "--no-progress"]
    for flag, value in overrides.items():
        argv += [flag, *value.split()] if value else [flag]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    compared = 0
    for flag, text in defaults.items():
        key = flag.removeprefix("--no-" if flag in ("--no-channels-last", "--no-baseline-dlib") else "--")
        key = key.replace("-", "_")
        if key not in config or flag in overrides or key in ("data", "out"):
            continue
        if config[key] is None:
            assert not re.fullmatch(r"[-0-9. ]+", text), (flag, text)  # None is shown as what it stands for
        else:
            assert text == shown(flag, config[key]), (flag, text, config[key])
        compared += 1
    # every TrainConfig option but --data, --out and those passed to keep the run short
    assert compared == len([f for f in dataclasses.fields(TrainConfig)]) - 2 - len(overrides)


SHORT = {"--steps": "2", "--cpu-tuning": "off", "--no-baseline-dlib": "", "--val-identities": "2"}


def test_help_shows_the_defaults_a_run_on_the_builtin_faces_writes(capsys, tmp_path):
    help_matches_run(capsys, tmp_path, "att", SHORT)
    assert help_defaults(capsys)["--optimizer"] == "adamw"  # a plain `siamkit train --help`: the faces recipe


def test_help_shows_the_defaults_a_run_on_a_folder_writes(capsys, tmp_path, att_faces):
    folder = tmp_path / "faces"  # 20 people: enough for the faces recipe's P = 16 identities per batch
    folder.mkdir()
    for person in range(1, 21):
        (folder / f"s{person}").symlink_to(att_faces / f"s{person}")
    help_matches_run(capsys, tmp_path, str(folder), SHORT)


def test_help_of_digits_shows_the_plain_defaults(capsys):
    defaults = help_defaults(capsys, "--data", "digits")
    assert (defaults["--optimizer"], defaults["--ema-decay"], defaults["--image-size"]) == ("adam", "0.0", "auto")


def test_for_data_is_what_the_command_line_runs():
    assert TrainConfig.for_data("att") == config_of()
    assert TrainConfig.for_data("digits", lr=0.01) == config_of("--data", "digits", "--lr", "0.01")
    assert TrainConfig.for_data("att", "none") == TrainConfig()
    assert TrainConfig.for_data("att", pretrained="dlib").backbone == "dlib-resnet29"

"""Extending siamkit through its registries alone: a toy loss, BN policy and data source train a step each.

Also: every option is declared once (the train parser is generated from TrainConfig), a run's config
replays with --config, and messages go through the "siamkit" logger into RUN/train.log.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from siamkit import cli
from siamkit.batchnorm import POLICIES, BNPolicy, register_policy
from siamkit.config import RECIPES, TrainConfig
from siamkit.data.sources import SOURCES, Source, load_source, register_source
from siamkit.errors import SiamkitError
from siamkit.losses import METRIC_LOSSES, MarginLoss, register_loss
from siamkit.train.loop import train
from tiny_run import metrics_rows, one_torch_thread, tiny_args, tiny_config  # noqa: F401

TOY_LOSS_VALUE = 0.625  # exact in float32 and in the CSV's 6 significant digits


@pytest.fixture
def toys():
    """Register a toy loss, policy and source; remove them afterwards. -> what each saw."""
    seen = {"policy_branches": [], "source_loads": 0}

    @register_loss("toy")
    class ToyLoss(MarginLoss):
        n_branches = 2
        default_margin = 1.0

        def forward(self, embeddings, labels):
            # A constant, kept in the graph so backward runs: the value metrics.csv must show.
            return embeddings.sum() * 0.0 + TOY_LOSS_VALUE

    @register_policy
    class ToyPolicy(BNPolicy):
        name = "toy-policy"

        def run_branches(self, run, branches, layers):
            seen["policy_branches"].append(len(branches))
            return [run(b) for b in branches]

    def load_toy(_name, pre, data_home):
        seen["source_loads"] += 1
        ds = load_source("digits", pre)
        return ds.subset(torch.arange(4).numpy())  # digits 0-3 only

    register_source("toy-digits", Source(load_toy, image_size=(24, 24), augment="none"))
    try:
        yield seen
    finally:
        METRIC_LOSSES.pop(("toy", "none"))
        POLICIES.pop("toy-policy")
        SOURCES.pop("toy-digits")


def test_a_toy_loss_policy_and_source_train_one_step_each(toys, tmp_path):
    cfg = tiny_config(tmp_path / "run", data="toy-digits", loss="toy", bn_policy="toy-policy",
                      classification_weight=0, steps=1, batch_size=4)
    train(cfg, progress=False)
    (row,) = metrics_rows(tmp_path / "run")
    assert float(row["metric"]) == TOY_LOSS_VALUE == float(row["loss"])  # the toy loss ran
    assert toys["policy_branches"] == [2]  # the toy policy ran the two branches of the toy loss's pairs
    assert toys["source_loads"] == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == "toy-digits" and config["loss"] == "toy"


def test_the_command_line_offers_registered_entries(toys):
    args = cli.build_parser().parse_args(["train", "--loss", "toy", "--bn-policy", "toy-policy", "--data", "toy-digits"])
    assert (args.loss, args.bn_policy, args.data) == ("toy", "toy-policy", "toy-digits")
    with pytest.raises(SiamkitError, match="--bn-policy 'nope' is not known; choose one of: joint, .*toy-policy"):
        TrainConfig(bn_policy="nope").validate()


def test_every_config_field_is_a_train_option_with_its_default():
    """The train parser is generated from TrainConfig: same names, same defaults, nothing on one side only."""
    parser = cli.build_parser()
    args = vars(parser.parse_args(["train"]))
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    not_config = {"command", "config", "recipe", "resume", "overwrite", "no_progress"}
    assert set(args) - not_config == fields
    assert TrainConfig.from_dict(args) == TrainConfig.for_data("att")  # what a plain `siamkit train` runs


def test_config_json_replays_a_run_and_flags_override_it(tmp_path):
    first = tmp_path / "first"
    assert cli.main(tiny_args(first, steps=1, embedding_dim=24, seed=3)) == 0
    second = tmp_path / "second"
    argv = ["train", "--config", str(first / "config.json"), "--out", str(second), "--seed", "5", "--no-progress"]
    assert cli.main(argv) == 0
    a, b = (json.loads((run / "config.json").read_text()) for run in (first, second))
    assert b["embedding_dim"] == 24 and b["steps"] == 1 and b["seed"] == 5 and a["seed"] == 3
    assert {k: v for k, v in a.items() if k not in ("seed", "out")} == {k: v for k, v in b.items() if k not in ("seed", "out")}


def test_config_with_an_unknown_option_is_refused(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"lr": 0.01, "learning_rate": 0.1}))
    assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"siamkit: error: --config {bad}: unknown option(s) learning_rate; remove them or fix their names"
    )
    assert not (tmp_path / "run").exists()


def test_messages_go_to_the_siamkit_logger_and_train_log(tmp_path, capfd):
    run = tmp_path / "run"
    train(tiny_config(run, steps=1, val_identities=0), progress=False)
    err = capfd.readouterr().err
    log = (run / "train.log").read_text().splitlines()
    # The same messages as on stderr, with a time stamp and level.
    assert [line.split(" INFO ", 1)[1] for line in log] == [
        line.removeprefix("siamkit: ") for line in err.splitlines() if line.startswith("siamkit: ")
    ]
    assert "training images" in log[0] and "no evaluation" in log[-1]

    logger = logging.getLogger("siamkit")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a Python user silences siamkit's messages
    try:
        train(tiny_config(tmp_path / "quiet", steps=1, val_identities=0), progress=False)
    finally:
        logger.setLevel(level)
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("siamkit:")]


def test_recipes_start_train_and_flags_override_them():
    faces = RECIPES["faces"]
    auto = TrainConfig.from_dict(vars(cli.parse_args(["train"])))  # the built-in faces: the faces recipe
    assert auto.data == "att" and all(getattr(auto, k) == v for k, v in faces.items())
    digits = TrainConfig.from_dict(vars(cli.parse_args(["train", "--data", "digits"])))
    assert digits == TrainConfig(data="digits")  # digits: no recipe, the plain defaults
    mine = TrainConfig.from_dict(vars(cli.parse_args(["train", "--data", "faces/", "--lr", "0.01", "--image-size", "48", "48"])))
    assert mine.lr == 0.01 and mine.image_size == [48, 48] and mine.backbone == faces["backbone"]  # a face folder
    plain = TrainConfig.from_dict(vars(cli.parse_args(["train", "--recipe", "none"])))
    assert plain == TrainConfig()
    assert set(faces) <= {f.name for f in dataclasses.fields(TrainConfig)}

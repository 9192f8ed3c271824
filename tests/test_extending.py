"""Extending siamkit through its registries alone: a toy of every kind (metric loss, BN policy, data source, backbone
with freeze stages, classifier head, optimizer, augmentation), registered the one way, trains a step.

Also: every option is declared once (the train parser is generated from TrainConfig), a run's config
replays with --config, and messages go through the "siamkit" logger into RUN/train.log.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from torch import nn

from siamkit import cli
from siamkit.batchnorm import POLICIES, BNPolicy, register_policy
from siamkit.config import RECIPES, TrainConfig
from siamkit.data.sources import SOURCES, Source, load_source, register_source
from siamkit.data.transforms import AUGMENTATIONS, register_augment
from siamkit.errors import SiamkitError
from siamkit.losses import METRIC_LOSSES, MarginLoss, register_loss
from siamkit.models.backbones import BACKBONES, Backbone, register_backbone
from siamkit.models.heads import CLASSIFIERS, register_classifier
from siamkit.models.siamese import ModelSpec, SiameseNet
from siamkit.optimizers import OPTIMIZERS, register_optimizer
from siamkit.train.loop import train
from tiny_run import metrics_rows, one_torch_thread, tiny_args, tiny_config  # noqa: F401

TOY_LOSS_VALUE = 0.625  # exact in float32 and in the CSV's 6 significant digits


class ToyNet(nn.Module):
    """A two-stage backbone: ``stem`` (convolution + BatchNorm) and ``body`` (convolution, pooled to 8 features).
    Each one built records its initial state in ``built``."""

    built: list[dict[str, torch.Tensor]] = []

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        ToyNet.built.append({k: v.detach().clone() for k, v in self.state_dict().items()})

    def forward(self, x):
        return self.body(self.stem(x))


@pytest.fixture
def toys():
    """Register a toy of every kind (loss, BN policy, data source, backbone with stages, classifier head, optimizer,
    augmentation), each through ``register_<kind>(name ...)``; remove them afterwards. -> what each saw."""
    seen = {"policy_branches": [], "source_loads": 0, "head_calls": 0, "optimizer_lr": [], "augmented": []}
    ToyNet.built.clear()

    @register_loss("toy")
    class ToyLoss(MarginLoss):
        n_branches = 2
        default_margin = 1.0

        def forward(self, embeddings, labels):
            # A constant, kept in the graph so backward runs: the value metrics.csv must show.
            return embeddings.sum() * 0.0 + TOY_LOSS_VALUE

    @register_policy("toy-policy")
    class ToyPolicy(BNPolicy):
        def run_branches(self, run, branches, layers):
            seen["policy_branches"].append(len(branches))
            return [run(b) for b in branches]

    def load_toy(_name, pre, data_home):
        seen["source_loads"] += 1
        ds = load_source("digits", pre)
        return ds.subset(torch.arange(4).numpy())  # digits 0-3 only

    register_source("toy-digits", Source(load_toy, image_size=(24, 24), augment="none"))
    register_backbone("toy-net", Backbone(None, 8, (("toy-stem", ("stem",)), ("toy-body", ("body",))), build=ToyNet))

    @register_classifier("toy-head")
    class ToyHead(nn.Module):
        supports_subcenters = False

        def __init__(self, in_features, n_classes, scale, margin, subcenters):
            super().__init__()
            self.n_classes = n_classes

        def forward(self, features, labels=None):
            seen["head_calls"] += 1
            # logits of value 0 (cross-entropy log(n_classes) exactly) whose gradient reaches the features
            first = features[:, :self.n_classes]
            return first - first.detach()

    @register_optimizer("toy-sgd")
    def toy_sgd(params, lr, betas, weight_decay):
        seen["optimizer_lr"].append(lr)
        return torch.optim.SGD(params, lr=lr)

    @register_augment("toy-invert")
    def toy_invert(image_size, settings):
        def invert(batch, generator):
            seen["augmented"].append((batch.dtype, tuple(batch.shape[2:])))
            return 255 - batch

        return invert

    try:
        yield seen
    finally:
        METRIC_LOSSES.pop(("toy", "none"))
        POLICIES.pop("toy-policy")
        SOURCES.pop("toy-digits")
        BACKBONES.pop("toy-net")
        CLASSIFIERS.pop("toy-head")
        OPTIMIZERS.pop("toy-sgd")
        AUGMENTATIONS.pop("toy-invert")


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


def test_a_toy_of_every_kind_trains_one_step_together(toys, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, data="toy-digits", loss="toy", bn_policy="toy-policy", backbone="toy-net",
                      freeze_until="toy-stem", classifier="toy-head", classification_weight=1.0, optimizer="toy-sgd",
                      lr=0.5, augment="toy-invert", steps=1, batch_size=4, cpu_tuning="off")
    train(cfg, progress=False)
    (row,) = metrics_rows(run)
    # the toy head's equal logits over the 4 training identities: cross-entropy log 4 on each branch; metrics.csv
    # keeps 6 significant digits, so |error| <= 5e-6 on values near 1.4 and 2.0
    assert abs(float(row["classification"]) - math.log(4)) <= 5e-6
    assert abs(float(row["loss"]) - (TOY_LOSS_VALUE + math.log(4))) <= 5e-6
    assert toys["head_calls"] >= 1 and toys["optimizer_lr"] == [0.5] and toys["policy_branches"] == [2]
    assert toys["augmented"] == [(torch.uint8, (32, 32))]  # one training batch, uint8, at the tiny --image-size
    # --freeze-until toy-stem, a stage of a backbone registered after import: the stem's BatchNorm (weights and
    # running statistics: eval mode) is as it was built, while the body's convolution took the SGD step
    (initial,) = ToyNet.built
    saved = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    for name in ("stem.1.weight", "stem.1.bias", "stem.1.running_mean", "stem.1.running_var"):
        assert torch.equal(saved[f"backbone.{name}"], initial[name]), name
    assert not torch.equal(saved["backbone.body.0.weight"], initial["body.0.weight"])
    model = SiameseNet(ModelSpec.of(cfg, in_channels=3, n_classes=4))
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "backbone.stem.0.weight", "backbone.stem.0.bias", "backbone.stem.1.weight", "backbone.stem.1.bias"]


def test_the_command_line_offers_registered_entries(toys):
    args = cli.build_parser().parse_args(["train", "--loss", "toy", "--bn-policy", "toy-policy", "--data", "toy-digits",
                                          "--backbone", "toy-net", "--freeze-until", "toy-body", "--classifier",
                                          "toy-head", "--optimizer", "toy-sgd", "--augment", "toy-invert"])
    assert (args.loss, args.bn_policy, args.data, args.backbone, args.freeze_until, args.classifier, args.optimizer,
            args.augment) == ("toy", "toy-policy", "toy-digits", "toy-net", "toy-body", "toy-head", "toy-sgd",
                              "toy-invert")
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

"""SiameseNet on a real ResNet18 and real faces: BN policies through the training step, freezing.

Every check compares against an independent path: deep copies of the starting model run branch by
branch, tensors saved before training, parameter counts of a freshly built torchvision ResNet18.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

from siamkit.batchnorm import bn_layers
from siamkit.config import TrainConfig
from siamkit.data.samplers import TupleSampler
from siamkit.data.sources import default_preprocess, load_source
from siamkit.data.transforms import normalize
from siamkit.losses import ContrastiveLoss, JointLoss, TripletLoss
from siamkit.models.siamese import ModelSpec, SiameseNet
from siamkit.batchnorm import forward_branches
from siamkit.train.step import TrainStep

SIZE = (32, 32)
STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


@pytest.fixture(scope="module")
def faces(att_faces):
    """AT&T faces at 32x32 (real images), and the preprocessing that made them."""
    pre = default_preprocess(str(att_faces), SIZE)
    return load_source(str(att_faces), pre), pre


def batches(faces, n_branches: int, batch_size: int, steps: int):
    """Real explicit tuples from the package's sampler: (images branch-major, labels)."""
    ds, pre = faces
    sampler = TupleSampler(ds.labels, n_branches, batch_size, seed=0)
    labels = torch.from_numpy(ds.labels)
    for step in range(steps):
        idx = torch.from_numpy(sampler.batch(step).reshape(-1))
        yield normalize(ds.images[idx], pre), labels[idx]


def net(**spec) -> SiameseNet:
    torch.manual_seed(0)
    return SiameseNet(ModelSpec(embedding_dim=16, **spec))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(model: SiameseNet, faces, steps: int, n_branches: int = 3, weight: float = 1.0) -> None:
    """The real training step (TrainStep + Adam over trainable_parameters), with eval/train round trips."""
    metric = TripletLoss() if n_branches == 3 else ContrastiveLoss()
    step = TrainStep(model, JointLoss(metric, weight), n_branches)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for i, (x, y) in enumerate(batches(faces, n_branches, 2, steps)):
        if i % 5 == 4:  # an evaluation in the middle of training must not unfreeze anything
            model.eval()
            with torch.no_grad():
                model.embed(x)
            model.train()
        out = step(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()


def changed(before: dict, after: dict, prefix: str) -> list[str]:
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


def test_frozen_policy_never_moves_bn_statistics_while_the_rest_trains(faces):
    model = net(n_classes=40, bn_policy="frozen")
    with torch.no_grad():  # stored statistics as a pretrained backbone would have them
        g = torch.Generator().manual_seed(1)
        for m in model.bn:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    start = snapshot(model)
    train_steps(model, faces, 20)
    end = snapshot(model)

    buffers = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(buffers) == 3 * 20  # ResNet18 has 20 BatchNorm layers
    assert not [k for k in buffers if not torch.equal(start[k], end[k])]
    assert all(not m.training for m in model.bn) and model.embedding.training
    # the rest trains: convolutions, BN's affine parameters and both heads
    assert changed(start, end, "backbone.conv1.weight") and changed(start, end, "backbone.layer4.1.conv2.weight")
    assert changed(start, end, "backbone.bn1.weight") and changed(start, end, "embedding.") and changed(start, end, "classifier.")


def test_frozen_policy_normalises_with_the_stored_statistics(faces):
    """In training mode, the frozen model's outputs are those of an eval-mode copy (no batch statistics)."""
    model = net(bn_policy="frozen")
    with torch.no_grad():
        for m in model.bn:
            m.running_mean.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(model).eval()
    model.eval()
    model.train()
    x, _ = next(batches(faces, 3, 3, 1))
    features, embeddings = forward_branches(model, x, 3, model.spec.bn_policy, model.bn)
    ref_features, ref_embeddings = reference(x)
    torch.testing.assert_close(features, ref_features)
    torch.testing.assert_close(embeddings, ref_embeddings)
    batch_stats = copy.deepcopy(reference)
    torch.nn.Module.train(batch_stats)  # plain nn.Module.train(): BN would normalise with batch statistics
    assert not torch.allclose(batch_stats.backbone(x), ref_features, atol=1e-3)


def test_freeze_until_avgpool_trains_only_the_heads(faces):
    model = net(n_classes=40, freeze_until="avgpool")
    heads = {id(p) for p in [*model.embedding.parameters(), *model.classifier.parameters()]}
    assert {id(p) for p in model.trainable_parameters()} == heads
    start = snapshot(model)
    train_steps(model, faces, 20)
    end = snapshot(model)
    frozen = [k for k in start if k.startswith("backbone.")]
    assert len(frozen) > 100
    assert not [k for k in frozen if not torch.equal(start[k], end[k])]  # weights and BN buffers, bit for bit
    assert changed(start, end, "embedding.") and changed(start, end, "classifier.")
    assert all(not m.training for m in model.bn)


def test_freeze_until_layer2_leaves_layer3_and_up_training(faces):
    model = net(freeze_until="layer2", bn_policy="mean")
    start = snapshot(model)
    train_steps(model, faces, 5, n_branches=2, weight=0.0)
    end = snapshot(model)
    for stage in ("conv1", "bn1", "layer1", "layer2"):
        keys = [k for k in start if k.startswith(f"backbone.{stage}.")]
        assert keys and not changed(start, end, f"backbone.{stage}."), stage
    for stage in ("layer3", "layer4"):
        moved = changed(start, end, f"backbone.{stage}.")
        assert any(k.endswith("conv1.weight") for k in moved), stage
        assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("num_batches_tracked") for k in moved)
    assert all(not m.training for m in bn_layers(model.backbone.layer2))
    assert all(m.training for m in bn_layers(model.backbone.layer3))
    assert all(p.requires_grad for p in model.backbone.layer3.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer2.parameters())


@pytest.mark.parametrize("until", ["conv1", "layer2", "avgpool"])
def test_trainable_parameter_count_matches_torchvision(until):
    model = net(n_classes=10, freeze_until=until)
    reference = models.resnet18(weights=None)
    stages = {"conv1": ("conv1", "bn1"), "layer2": ("conv1", "bn1", "layer1", "layer2"), "avgpool": STAGES}[until]
    frozen = sum(p.numel() for s in stages for p in getattr(reference, s).parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.trainable_parameters()) == total - frozen
    assert all(p.requires_grad for p in model.trainable_parameters())


def test_training_loop_hands_the_optimizer_only_trainable_parameters(tmp_path, monkeypatch, capsys):
    seen = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            seen.extend(params)
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    from siamkit.train.loop import train

    cfg = TrainConfig(data="digits", steps=2, image_size=[32, 32], batch_size=4, freeze_until="layer2",
                      val_identities=0, out=str(tmp_path / "run"))
    train(cfg, progress=False)
    reference = models.resnet18(weights=None)
    frozen = sum(p.numel() for s in ("conv1", "bn1", "layer1", "layer2") for p in getattr(reference, s).parameters())
    assert seen and all(p.requires_grad for p in seen)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    total = sum(v.numel() for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in seen) == total - frozen
    assert f"{total - frozen:,} of {total:,} parameters train" in capsys.readouterr().err


# --------------------------------------------------------------------------- the training step under each policy


def _reference_step(model: SiameseNet, x, y, n_branches: int, policy: str, loss: JointLoss):
    """Loss terms and BN state each policy must produce, from deep copies of the starting model."""
    parts, labels = x.chunk(n_branches), y.chunk(n_branches)
    if policy == "joint":
        twin = copy.deepcopy(model)
        features, embeddings = twin(x)
        per_branch = [(f, e) for f, e in zip(features.chunk(n_branches), embeddings.chunk(n_branches))]
        state = twin.state_dict()
    else:
        copies = [copy.deepcopy(model) for _ in parts]
        per_branch = [c(b) for c, b in zip(copies, parts)]  # each branch normalised alone
        if policy == "sequential":
            twin = copy.deepcopy(model)
            for b in parts:
                twin(b)
            state = twin.state_dict()
        elif policy == "anchor":
            state = copies[0].state_dict()
        else:  # mean
            states = [c.state_dict() for c in copies]
            state = {k: (sum(s[k] for s in states) / n_branches if k.endswith(("mean", "var")) else v + 1 if k.endswith("tracked") else v)
                     for k, v in model.state_dict().items()}
    embeddings = torch.cat([e for _, e in per_branch])
    ce = [F.cross_entropy(model.classify(f, lb), lb) for (f, _), lb in zip(per_branch, labels)]
    metric = loss.metric(embeddings, y)
    return metric, sum(ce) / n_branches, state


@pytest.mark.parametrize(
    "policy,loss_name,classifier",
    [("joint", "triplet", "softmax"), ("mean", "contrastive", "arcface"), ("sequential", "triplet", "cosface"),
     ("anchor", "contrastive", "softmax"), ("mean", "triplet", "softmax")],
)
def test_train_step_matches_a_per_branch_reference(faces, policy, loss_name, classifier):
    n_branches = 3 if loss_name == "triplet" else 2
    model = net(n_classes=40, classifier=classifier, bn_policy=policy)
    x, y = next(batches(faces, n_branches, 3, 1))
    weight = 0.5
    loss = JointLoss(TripletLoss() if n_branches == 3 else ContrastiveLoss(), weight)
    metric, classification, state = _reference_step(model, x, y, n_branches, policy, loss)
    out = TrainStep(model, loss, n_branches)(x, y)
    torch.testing.assert_close(out["metric"], metric, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["classification"], classification, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"], metric + weight * classification, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(v, state[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("policy,passes", [("joint", 1), ("frozen", 1), ("sequential", 3), ("mean", 3), ("anchor", 3)])
def test_backbone_passes_per_step_and_both_heads_read_that_pass(faces, policy, passes):
    model = net(n_classes=40, bn_policy=policy)
    calls, seen_by_classifier = [], []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(o))
    model.classifier.register_forward_hook(lambda m, i, o: seen_by_classifier.append(i[0]))
    x, y = next(batches(faces, 3, 2, 1))
    TrainStep(model, JointLoss(TripletLoss(), 1.0), 3)(x, y)
    assert len(calls) == passes
    assert len(seen_by_classifier) == 1  # one classifier call over all branches, fed by those passes
    assert torch.equal(seen_by_classifier[0], torch.cat(calls))

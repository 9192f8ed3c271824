"""BatchNorm policies against a hand-written BatchNorm and against deep copies of the starting state.

The reference (``RefNet``) re-implements the tiny network functionally with its own batch-norm
arithmetic (batch mean, biased variance to normalise, unbiased variance and momentum or the cumulative
average for the running statistics), so it shares no code with torch.nn.BatchNorm or siamkit.batchnorm.
Everything runs in float64 so that the comparisons can be tight.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siamkit.batchnorm import POLICIES, bn_layers, forward_branches

BN_NAMES = ("bn1", "bn2", "bn3")
TOL = dict(rtol=1e-10, atol=1e-12)


class TinyNet(nn.Module):
    """conv -> BN2d -> relu -> conv -> BN2d -> relu -> pool -> linear -> BN1d = features -> linear -> l2 = embeddings."""

    def __init__(self, momentum: float | None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, momentum=momentum)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5, momentum=momentum)
        self.fc = nn.Linear(5, 6)
        self.bn3 = nn.BatchNorm1d(6, momentum=momentum)
        self.emb = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        features = self.bn3(self.fc(h.mean(dim=(2, 3))))
        return features, F.normalize(self.emb(features), dim=1)


def tiny_net(momentum: float | None, seed: int = 0) -> TinyNet:
    """A TinyNet in float64 with non-trivial BN affine parameters and running statistics."""
    torch.manual_seed(seed)
    net = TinyNet(momentum).double()
    with torch.no_grad():
        for name in BN_NAMES:
            bn = getattr(net, name)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(3)  # momentum=None then averages with factor 1/4, 1/5, ...
    return net


def branches_input(n_branches: int, per_branch: int = 4, seed: int = 1) -> torch.Tensor:
    """Branch-major input whose branches have clearly different statistics."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(per_branch, 3, 6, 6, generator=g, dtype=torch.float64) * (1 + b) + 2 * b for b in range(n_branches)]
    return torch.cat(parts)


def state_of(net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {
        n: (getattr(net, n).running_mean.clone(), getattr(net, n).running_var.clone(), int(getattr(net, n).num_batches_tracked))
        for n in BN_NAMES
    }


# --------------------------------------------------------------------------- the hand-written reference


def ref_bn(x, bn: nn.BatchNorm2d | nn.BatchNorm1d, state, mode: str):
    """Batch norm by hand. mode: "update" (batch stats, new running stats), "batch" (batch stats, no update),
    "eval" (running stats). Returns (y, new state)."""
    mean_r, var_r, count = state
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    if mode == "eval":
        mu, var = mean_r, var_r
    else:
        n = x.numel() // x.shape[1]
        mu = x.sum(dim=dims) / n
        var = ((x - mu.view(shape)) ** 2).sum(dim=dims) / n
    y = (x - mu.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    if mode != "update":
        return y, state
    count = count + 1
    f = 1.0 / count if bn.momentum is None else bn.momentum
    unbiased = var.detach() * n / (n - 1)
    return y, ((1 - f) * mean_r + f * mu.detach(), (1 - f) * var_r + f * unbiased, count)


def ref_forward(net: TinyNet, state: dict, x: torch.Tensor, mode: str):
    """TinyNet's forward with ref_bn: (features, embeddings, new state)."""
    new = dict(state)
    h = F.conv2d(x, net.conv1.weight, padding=1)
    h, new["bn1"] = ref_bn(h, net.bn1, state["bn1"], mode)
    h = F.conv2d(F.relu(h), net.conv2.weight, net.conv2.bias, stride=2, padding=1)
    h, new["bn2"] = ref_bn(h, net.bn2, state["bn2"], mode)
    h = F.relu(h).mean(dim=(2, 3)) @ net.fc.weight.t() + net.fc.bias
    features, new["bn3"] = ref_bn(h, net.bn3, state["bn3"], mode)
    z = features @ net.emb.weight.t() + net.emb.bias
    return features, z / torch.sqrt((z * z).sum(dim=1, keepdim=True)), new


def ref_policy(net: TinyNet, state: dict, x: torch.Tensor, n_branches: int, policy: str):
    """What each policy must do, spelled out with the reference: (features, embeddings, new state)."""
    if policy == "joint":
        return ref_forward(net, state, x, "update")
    parts = x.chunk(n_branches)
    outs = []
    if policy == "sequential":
        s = state
        for b in parts:
            f, e, s = ref_forward(net, s, b, "update")
            outs.append((f, e))
        new = s
    elif policy == "anchor":
        f, e, new = ref_forward(net, state, parts[0], "update")
        outs.append((f, e))
        outs += [ref_forward(net, state, b, "batch")[:2] for b in parts[1:]]
    elif policy == "mean":
        ends = []
        for b in parts:
            f, e, s = ref_forward(net, state, b, "update")
            outs.append((f, e))
            ends.append(s)
        new = {
            n: (sum(s[n][0] for s in ends) / n_branches, sum(s[n][1] for s in ends) / n_branches, state[n][2] + 1)
            for n in BN_NAMES
        }
    else:
        raise AssertionError(policy)
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), new


def assert_state(net: nn.Module, expected: dict) -> None:
    for n in BN_NAMES:
        bn = getattr(net, n)
        mean, var, count = expected[n]
        torch.testing.assert_close(bn.running_mean, mean.detach(), **TOL, msg=f"{n}.running_mean")
        torch.testing.assert_close(bn.running_var, var.detach(), **TOL, msg=f"{n}.running_var")
        assert int(bn.num_batches_tracked) == count, f"{n}.num_batches_tracked"


MULTI_PASS = ("sequential", "mean", "anchor")
POLICY_CASES = [(p, nb, m) for p in ("joint", *MULTI_PASS) for nb in (2, 3) for m in (0.1, None)]


# --------------------------------------------------------------------------- running statistics and outputs


@pytest.mark.parametrize("policy,n_branches,momentum", POLICY_CASES)
def test_policy_matches_hand_computed_batchnorm(policy, n_branches, momentum):
    net = tiny_net(momentum)
    x = branches_input(n_branches)
    start = state_of(net)
    features, embeddings = forward_branches(net, x, n_branches, policy, bn_layers(net))
    ref_f, ref_e, expected = ref_policy(net, start, x, n_branches, policy)
    torch.testing.assert_close(features, ref_f, **TOL)
    torch.testing.assert_close(embeddings, ref_e, **TOL)
    assert_state(net, expected)
    counts = {n: int(getattr(net, n).num_batches_tracked) - start[n][2] for n in BN_NAMES}
    assert set(counts.values()) == {n_branches if policy == "sequential" else 1}


@pytest.mark.parametrize("policy,n_branches,momentum", POLICY_CASES)
def test_policy_survives_train_eval_round_trips(policy, n_branches, momentum):
    """step, eval forward (changes nothing, uses running stats), train again, step: all as the reference says."""
    net = tiny_net(momentum)
    layers = bn_layers(net)
    x1, x2 = branches_input(n_branches, seed=1), branches_input(n_branches, seed=2)
    state = state_of(net)
    forward_branches(net, x1, n_branches, policy, layers)
    state = ref_policy(net, state, x1, n_branches, policy)[2]

    net.eval()
    with torch.no_grad():
        f, e = forward_branches(net, x2, n_branches, policy, layers)
    ref_f, ref_e, _ = ref_forward(net, state, x2, "eval")
    torch.testing.assert_close(f, ref_f, **TOL)
    torch.testing.assert_close(e, ref_e, **TOL)
    assert_state(net, state)  # evaluation leaves the running stats alone

    net.train()
    f, e = forward_branches(net, x2, n_branches, policy, layers)
    ref_f, ref_e, state = ref_policy(net, state, x2, n_branches, policy)
    torch.testing.assert_close(f, ref_f, **TOL)
    assert_state(net, state)
    assert all(m.training and m.track_running_stats for m in layers)  # anchor's switch was undone


@pytest.mark.parametrize("n_branches", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_joint_is_one_forward_over_the_concatenated_batch(n_branches, momentum):
    net = tiny_net(momentum)
    twin = copy.deepcopy(net)
    x = branches_input(n_branches)
    f, e = forward_branches(net, x, n_branches, "joint", bn_layers(net))
    f2, e2 = twin(x)
    assert torch.equal(f, f2) and torch.equal(e, e2)
    for n in BN_NAMES:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(getattr(net, n), buf), getattr(getattr(twin, n), buf)), f"{n}.{buf}"


@pytest.mark.parametrize("n_branches", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_mean_is_the_average_of_per_branch_updates_from_deep_copies(n_branches, momentum):
    net = tiny_net(momentum)
    x = branches_input(n_branches)
    copies = [copy.deepcopy(net) for _ in range(n_branches)]
    outs = [c(b) for c, b in zip(copies, x.chunk(n_branches))]
    start_count = int(net.bn1.num_batches_tracked)
    f, e = forward_branches(net, x, n_branches, "mean", bn_layers(net))
    torch.testing.assert_close(f, torch.cat([o[0] for o in outs]), **TOL)
    torch.testing.assert_close(e, torch.cat([o[1] for o in outs]), **TOL)
    for n in BN_NAMES:
        bn = getattr(net, n)
        torch.testing.assert_close(bn.running_mean, sum(getattr(c, n).running_mean for c in copies) / n_branches, **TOL)
        torch.testing.assert_close(bn.running_var, sum(getattr(c, n).running_var for c in copies) / n_branches, **TOL)
        assert int(bn.num_batches_tracked) == start_count + 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequential_equals_successive_calls_and_anchor_equals_branch_zero_alone(momentum):
    x = branches_input(3)
    net, twin = tiny_net(momentum), tiny_net(momentum)
    forward_branches(net, x, 3, "sequential", bn_layers(net))
    for b in x.chunk(3):
        twin(b)
    for n in BN_NAMES:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(getattr(net, n), buf), getattr(getattr(twin, n), buf))

    net, twin = tiny_net(momentum), tiny_net(momentum)
    forward_branches(net, x, 3, "anchor", bn_layers(net))
    twin(x.chunk(3)[0])
    for n in BN_NAMES:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(getattr(net, n), buf), getattr(getattr(twin, n), buf))


def test_eval_mode_bn_layers_are_left_alone_by_every_policy():
    """Layers already in eval mode (frozen ones) normalise with running stats under every policy."""
    x = branches_input(3)
    for policy in POLICIES:
        net = tiny_net(0.1)
        net.bn2.eval()
        before = state_of(net)
        forward_branches(net, x, 3, policy, bn_layers(net))
        after = state_of(net)
        assert torch.equal(after["bn2"][0], before["bn2"][0]) and torch.equal(after["bn2"][1], before["bn2"][1])
        assert after["bn2"][2] == before["bn2"][2]
        assert not torch.equal(after["bn1"][0], before["bn1"][0])  # the training-mode layers did update


def test_unknown_policy_is_refused():
    net = tiny_net(0.1)
    with pytest.raises(ValueError, match="unknown BatchNorm policy"):
        forward_branches(net, branches_input(2), 2, "average", bn_layers(net))


# --------------------------------------------------------------------------- gradients


def _grads(net: nn.Module, features: torch.Tensor, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    loss = (features * torch.randn(features.shape, generator=g, dtype=features.dtype)).sum() + (
        embeddings * torch.randn(embeddings.shape, generator=g, dtype=embeddings.dtype)
    ).sum()
    net.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("n_branches", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_gradients_match_the_hand_written_reference(n_branches, momentum):
    """Per-branch policies normalise each branch alone, so sequential, mean and anchor share one gradient,
    the reference's; joint normalises over all branches and gets another one."""
    x = branches_input(n_branches)
    grads = {}
    for policy in ("joint", *MULTI_PASS):
        net = tiny_net(momentum)
        grads[policy] = _grads(net, *forward_branches(net, x, n_branches, policy, bn_layers(net)))
    expected = {}
    for policy in ("joint", "mean"):
        net = tiny_net(momentum)
        f, e, _ = ref_policy(net, state_of(net), x, n_branches, policy)
        expected[policy] = _grads(net, f, e)
    for policy in ("joint", *MULTI_PASS):
        ref = expected["joint" if policy == "joint" else "mean"]
        for k in ref:
            torch.testing.assert_close(grads[policy][k], ref[k], rtol=1e-9, atol=1e-11, msg=f"{policy}: {k}")
    assert not torch.allclose(grads["joint"]["conv1.weight"], grads["mean"]["conv1.weight"])


# --------------------------------------------------------------------------- the run records its policy


def test_bn_policy_is_saved_in_config_and_checkpoint(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--data", "digits", "--steps", "2", "--image-size", "32", "32", "--batch-size", "4",
            "--bn-policy", "mean", "--val-identities", "0", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["bn_policy"] == "mean"
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["bn_policy"] == "mean"
    assert ckpt["model_spec"]["bn_policy"] == "mean"
    from siamkit.api import load_model

    model, _ = load_model(out)
    assert model.spec.bn_policy == "mean"

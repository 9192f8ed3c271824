"""Code that runs inside the processes of a 2-process gloo group (spawned by test_distributed.py).

Each worker joins the group once and then runs several checks or training runs in it: starting
Python + PyTorch is the expensive part of a distributed test on CPU.
"""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group; raise what any raised."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # two processes on a 2-core CI runner
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def recording_step():
    """A TrainStep that remembers the model it trains and that model's state before the first step."""
    from siamkit.train.step import TrainStep

    class RecordingStep(TrainStep):
        model_seen = None
        initial_state = None

        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            RecordingStep.model_seen = model
            RecordingStep.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return RecordingStep


def recording_ema():
    """A WeightEMA that remembers the last one made (the run's average, read after the run)."""
    from siamkit.train.ema import WeightEMA

    class RecordingEMA(WeightEMA):
        last = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            RecordingEMA.last = self

    return RecordingEMA


@contextlib.contextmanager
def float64_training():
    """siamkit's training loop in float64: the model's parameters and buffers, and the images it is fed.

    For comparisons whose claim is exactness (same arithmetic, another order of reductions). In float32
    two such runs' gradients differ by up to 3e-8 (step 1) and 6e-7 (step 2) absolute: above Adam's eps
    (1e-8) and not small against most of ResNet-18's gradients (8.6M of 11.2M are below 1e-6), so Adam
    moves those weights by up to lr either way. In float64 they differ by ~1e-14, a millionth of eps.
    siamkit's losses still evaluate in float32 (they cast the embeddings), on the same rounded values in
    runs whose embeddings agree to float64 precision.
    """
    from siamkit.train import run

    build_model, normalize = run.build_model, run.normalize
    run.build_model = lambda *args, **kwargs: build_model(*args, **kwargs).double()
    run.normalize = lambda *args, **kwargs: normalize(*args, **kwargs).double()
    try:
        yield
    finally:
        run.build_model, run.normalize = build_model, normalize


def train_runs(rank: int, world: int, runs: list[tuple[str, dict, dict]], record: str) -> None:
    """Train each (name, config, train() keywords) in turn; save each process's model to RECORD/name-rankR.pt.

    (and the model before its first step to RECORD/name-rankR-initial.pt; with --ema-decay, the process's
    averages to RECORD/name-rankR-ema.pt). The keyword ``float64=True``
    is not train()'s: it trains that run under float64_training().
    """
    from siamkit.config import TrainConfig
    from siamkit.train import loop, run

    run.TrainStep = step = recording_step()
    run.WeightEMA = ema = recording_ema()
    for name, overrides, kwargs in runs:
        kwargs = dict(kwargs)
        with float64_training() if kwargs.pop("float64", False) else contextlib.nullcontext():
            loop.train(TrainConfig(**overrides), progress=False, **kwargs)
        torch.save(step.model_seen.state_dict(), Path(record) / f"{name}-rank{rank}.pt")
        torch.save(step.initial_state, Path(record) / f"{name}-rank{rank}-initial.pt")
        if overrides.get("ema_decay"):
            torch.save(ema.last.averages, Path(record) / f"{name}-rank{rank}-ema.pt")


def sync_bn_checks(rank: int, world: int) -> None:
    """AllReduceBatchNorm across the processes == one nn.BatchNorm over the concatenated batch."""
    from siamkit.train.sync_bn import AllReduceBatchNorm

    # Unequal shares (3 and 5 rows) so that the counts, not just the means, must be combined.
    sizes = [3, 5]
    bounds = [0, 3, 8]
    for shape, momentum in (((8, 4, 3, 2), 0.1), ((8, 4), None)):
        gen = torch.Generator().manual_seed(7)
        x_all = torch.randn(shape, generator=gen) * 3 + 1.5
        coef = torch.randn(shape, generator=gen)
        ref = torch.nn.BatchNorm2d(4, momentum=momentum) if len(shape) == 4 else torch.nn.BatchNorm1d(4, momentum=momentum)
        mine = AllReduceBatchNorm(4, momentum=momentum)
        with torch.no_grad():
            for m in (ref, mine):
                m.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
                m.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
        assert sum(sizes) == shape[0]
        for repeat in range(2):  # twice: running stats accumulate (and the cumulative average counts)
            x_ref = (x_all * (repeat + 1)).requires_grad_(True)
            y_ref = ref(x_ref)
            (y_ref * coef).sum().backward()
            x_mine = (x_all[bounds[rank] : bounds[rank + 1]] * (repeat + 1)).requires_grad_(True)
            y_mine = mine(x_mine)
            # This process's share of the same total loss.
            (y_mine * coef[bounds[rank] : bounds[rank + 1]]).sum().backward()
            torch.testing.assert_close(y_mine, y_ref[bounds[rank] : bounds[rank + 1]], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x_mine.grad, x_ref.grad[bounds[rank] : bounds[rank + 1]], rtol=1e-4, atol=1e-5)
            for p_ref, p_mine in ((ref.weight, mine.weight), (ref.bias, mine.bias)):
                total = p_mine.grad.clone()
                dist.all_reduce(total)  # each process holds its share; DDP would reduce them
                torch.testing.assert_close(total, p_ref.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
            assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == repeat + 1
        # Eval mode: the stored statistics, no collective.
        mine.eval(), ref.eval()
        torch.testing.assert_close(mine(x_all[:2]), ref(x_all[:2]))
        # Not tracking (the anchor policy's later branches): global batch statistics, buffers untouched.
        mine.train(), ref.train()
        before = (mine.running_mean.clone(), mine.running_var.clone(), int(mine.num_batches_tracked))
        mine.track_running_stats = ref.track_running_stats = False
        with torch.no_grad():
            y_ref, y_mine = ref(x_all), mine(x_all[bounds[rank] : bounds[rank + 1]])
        torch.testing.assert_close(y_mine, y_ref[bounds[rank] : bounds[rank + 1]], rtol=1e-5, atol=1e-5)
        assert torch.equal(mine.running_mean, before[0]) and torch.equal(mine.running_var, before[1])
        assert int(mine.num_batches_tracked) == before[2]


def gather_checks(rank: int, world: int) -> None:
    """gather_with_grad keeps the branch-major layout and sends each row's gradient back to its owner."""
    from siamkit.train.distributed import gather_with_grad

    b, d, n_branches = 2, 3, 3
    # Process r holds rows [branch][r*b:(r+1)*b] of a global branch-major batch.
    global_batch = torch.arange(n_branches * world * b * d, dtype=torch.float32).reshape(n_branches, world * b, d)
    mine = global_batch[:, rank * b : (rank + 1) * b].reshape(-1, d).clone().requires_grad_(True)
    gathered = gather_with_grad(mine, n_branches)
    assert torch.equal(gathered, global_batch.reshape(-1, d))
    weights = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(3))
    (gathered * weights).sum().backward()  # the same loss on every process
    expected = world * weights.reshape(n_branches, world * b, d)[:, rank * b : (rank + 1) * b].reshape(-1, d)
    torch.testing.assert_close(mine.grad, expected)
    labels = torch.arange(n_branches * b) + 100 * rank
    assert gather_with_grad(labels, n_branches).tolist() == [
        100 * r + i for branch in range(n_branches) for r in range(world) for i in range(branch * b, (branch + 1) * b)
    ]


def sharded_embed_checks(rank: int, world: int) -> None:
    """embed_images(sharded=True) returns the same rows, in order, as one process embedding everything."""
    from siamkit.data.cache import ImageRows
    from siamkit.data.transforms import Preprocess
    from siamkit.eval.embed import embed_images

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 5)

        def embed(self, x):
            return self.lin(x.flatten(1).float())

    torch.manual_seed(0)
    model = Tiny()
    pre = Preprocess((4, 4), 1.0, 1, (0.5,), (0.25,))
    for n in (7, 8, 1, 0):  # odd split, even split, fewer images than processes, none
        images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        whole = embed_images(model, images, pre, batch_size=3, channels_last=False)
        sharded = embed_images(model, images, pre, batch_size=3, channels_last=False, sharded=True)
        assert sharded.shape == whole.shape, (n, sharded.shape, whole.shape)
        torch.testing.assert_close(torch.from_numpy(sharded), torch.from_numpy(whole), rtol=1e-6, atol=1e-6)
        # The same images memory-mapped from a decoded cache: each share is read batch by batch, the same rows.
        cached = embed_images(model, ImageRows(images.numpy()), pre, batch_size=3, channels_last=False, sharded=True)
        assert np.array_equal(cached, sharded), n




def step_gradient_checks(rank: int, world: int) -> None:
    """One training step's gradients: 2 processes x B (DDP, gathered embeddings) == 1 process x 2B.

    Checked before any optimizer, so the tolerance is on the gradients themselves. Both BN set-ups
    that make the forward independent of the split: frozen, and joint with --sync-bn.
    """
    import copy

    from siamkit.config import TrainConfig
    from siamkit.data.samplers import PKSampler
    from siamkit.data.sources import load_source
    from siamkit.data.transforms import normalize
    from siamkit.losses import JointLoss, build_metric_loss
    from siamkit.train import distributed, run
    from siamkit.train.step import TrainStep
    from siamkit.train.sync_bn import convert_to_sync_bn

    cpu = torch.device("cpu")
    pre = run.preprocess_for(TrainConfig(image_size=[32, 32]))
    ds = load_source("digits", pre)
    for policy, sync in (("frozen", False), ("joint", True)):
        cfg = TrainConfig(backbone="resnet18", embedding_dim=16, image_size=[32, 32], bn_policy=policy)
        torch.manual_seed(0)
        reference = run.build_model(TrainConfig(**{**cfg.to_dict(), "classification_weight": 0.5}), 10, pre.channels)
        model = copy.deepcopy(reference)
        if sync:
            convert_to_sync_bn(model, cpu)
        loss = JointLoss(build_metric_loss("triplet", "batch-hard", 0.2), classification_weight=0.5)
        step = TrainStep(model, loss, 1, distributed.wrap_ddp(model, cpu), distributed.gather_with_grad)
        labels = torch.from_numpy(ds.labels)
        mine = torch.from_numpy(PKSampler(ds.labels, 3, 3, 0, rank, world).batch(0).reshape(-1))
        out = step(normalize(ds.images[mine], pre), labels[mine])
        out["loss"].backward()
        whole = torch.from_numpy(PKSampler(ds.labels, 3 * world, 3, 0).batch(0).reshape(-1))
        ref_out = TrainStep(reference, loss, 1)(normalize(ds.images[whole], pre), labels[whole])
        ref_out["loss"].backward()
        for key in ("loss", "metric", "classification"):
            torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=0)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            assert p.grad is not None and p_ref.grad is not None, name
            scale = float(p_ref.grad.abs().max())
            error = float((p.grad - p_ref.grad).abs().max())
            # Float noise: ~1e-6 of the largest gradient entry frozen, ~2e-5 with synced BN (another,
            # equally exact, order of BN arithmetic). A wrong gradient scale would be off by 50-100%.
            assert error <= 2e-4 * scale, (policy, name, error, scale)
        for m, m_ref in zip(model.bn, reference.bn):
            torch.testing.assert_close(m.running_mean, m_ref.running_mean, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(m.running_var, m_ref.running_var, rtol=1e-4, atol=1e-6)


def collective_checks(rank: int, world: int) -> None:
    sync_bn_checks(rank, world)
    gather_checks(rank, world)
    sharded_embed_checks(rank, world)
    step_gradient_checks(rank, world)

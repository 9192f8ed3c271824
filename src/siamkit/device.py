"""Which device a command runs on, shared by training, evaluation and the Python API."""
from __future__ import annotations

import torch

from .errors import SiamkitError


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; under torchrun ``cuda`` is GPU ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SiamkitError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        if distributed and name != "cuda":
            raise SiamkitError(f"--device {name}: under torchrun each process uses GPU LOCAL_RANK; pass --device cuda or auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    return torch.device("cpu")


def use_fast_cuda_kernels(device: torch.device) -> None:
    """Training on CUDA: fixed shapes, so let cuDNN pick its fastest kernels; TF32 matmuls and convolutions."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

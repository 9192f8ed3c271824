"""The line that names the machine in every benchmark table, and where the benchmarks find the real data."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from siamkit.kernel_choice import cpu_model

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The folder of the real data sets (att_faces/, rof_neutral/): $SIAMKIT_DATA, else ../shared/data beside the
    repository, as in the tests (tests/conftest.py)."""
    return Path(os.environ.get("SIAMKIT_DATA", REPO.parent / "shared" / "data"))


# /proc/cpuinfo flags that decide which kernels oneDNN and ATen can run (vector width, bf16/int8 dot products, AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Those of ISA_FLAGS the CPU reports (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return []
    return [flag for flag in ISA_FLAGS if flag in flags]


def describe_device(device_type: str) -> str:
    """The GPU's name, or the CPU model with its ISA (torch's kernels and the CPU's flags), cores and threads."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    flags = cpu_flags()
    return (
        f"{cpu_model()}, ISA: torch {torch.backends.cpu.get_cpu_capability()}"
        + (f", flags {' '.join(flags)}" if flags else "")
        + f"; {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    )

"""The line that names the machine in every benchmark table."""
from __future__ import annotations

import os
import platform

import torch


def describe_device(device_type: str) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"

"""--cpu-allocator: the cached setting makes freed memory come back without page faults; train sets it on CPU only.

The fault counts run in fresh Python processes: mallopt changes a whole process, and a process that already
reused memory (this one, after other tests) would not show the difference.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from siamkit.config import TrainConfig
from siamkit.errors import SiamkitError
from siamkit.train import cpu_memory
from siamkit.train.loop import train
from tiny_run import one_torch_thread, tiny_config  # noqa: F401

SRC = Path(cpu_memory.__file__).resolve().parents[2]
BLOCK_BYTES = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB), like a large activation
CYCLES = 5
# glibc settles into reusing the freed block only after a few cycles (7 here: until then memalign's
# alignment slack keeps the freed block a little too small, and the heap grows instead).
WARMUP_CYCLES = 20
PAGE_BYTES = 4096

# Allocates, touches and frees a 64 MiB tensor WARMUP_CYCLES + CYCLES times; prints the minor faults of the last CYCLES.
FAULTS = f"""
import resource, sys, torch
from siamkit.train import cpu_memory
if sys.argv[1] == "cached":
    assert cpu_memory.keep_freed_memory()
def cycle():
    t = torch.empty({BLOCK_BYTES} // 4)
    t.fill_(1.0)
    del t
for _ in range({WARMUP_CYCLES}):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CYCLES}):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> int:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


def transparent_huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cached_setting_reuses_freed_memory_without_page_faults():
    pages = CYCLES * BLOCK_BYTES // PAGE_BYTES  # 81,920: what the kernel maps in again when each block is new
    system, cached = faults("system"), faults("cached")
    assert cached < pages // 100, (cached, system)
    if transparent_huge_pages_always():  # 2 MiB pages: 512 times fewer faults, still some
        assert system > cached
    else:
        assert system >= 0.9 * pages, (cached, system)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called without glibc"))
    assert cpu_memory.keep_freed_memory() is False


@pytest.mark.parametrize("setting, calls", [("cached", 1), ("system", 0)])
def test_train_on_cpu_sets_the_allocator_as_asked(setting, calls, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: seen.append(True) or True)
    train(tiny_config(tmp_path / "run", steps=1, cpu_allocator=setting), progress=False)
    assert len(seen) == calls


def test_unknown_allocator_is_refused():
    with pytest.raises(SiamkitError, match="--cpu-allocator 'jemalloc' is not known; choose one of: cached, system"):
        TrainConfig(cpu_allocator="jemalloc").validate()

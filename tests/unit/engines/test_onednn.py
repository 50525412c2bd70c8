"""oneDNN's kernel caches are bounded in engine processes (pipeline/engines/onednn.py): an
engine that sees a new batch shape again and again keeps a flat heap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engines import onednn

# A fresh process (the capacities are read when oneDNN compiles its first kernel) fills 368
# batches of distinct shapes with a 1-layer torch engine and prints how much its live heap
# (glibc `mallinfo2`, after `malloc_trim`) grew after the first 16.
HEAP_GROWTH = """
import ctypes, sys
from pathlib import Path
from pipeline.engines.torch_engine import TorchEngine
from pipeline.glm.demo import write_random_demo_checkpoint
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.job.rows import release_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                .split()]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
engine = TorchEngine(write_random_demo_checkpoint(
    Path(sys.argv[1]), num_layers=1, hidden_size=128, num_attention_heads=2,
    max_sequence_length=128))

def live_heap_after(shapes):
    for rows, words in shapes:
        engine.fill([" ".join(["the"] * words) + " [MASK]"] * rows, MultiMask.ITERATIVE,
                    SamplingParams(max_new_tokens=1))
    release_freed_memory()
    return mallinfo2().uordblks

shapes = [(rows, words) for words in range(8, 100) for rows in range(1, 5)]
before = live_heap_after(shapes[:16])
print((live_heap_after(shapes[16:]) - before) / 2**20)
"""


def heap_growth_mib(root: Path, **env: str) -> float:
    environ = {k: v for k, v in os.environ.items() if k not in onednn.KERNEL_CACHES}
    done = subprocess.run([sys.executable, "-c", HEAP_GROWTH, str(root)],
                          env={**environ, **env}, capture_output=True, text=True,
                          timeout=300, check=True)
    return float(done.stdout.split()[-1])


def test_caches_are_bounded_unless_the_user_set_them() -> None:
    environ = {"LRU_CACHE_CAPACITY": "512"}
    onednn.bound_kernel_caches(environ)
    assert environ == {"LRU_CACHE_CAPACITY": "512",
                       "ONEDNN_PRIMITIVE_CACHE_CAPACITY": onednn.KERNEL_CACHE_CAPACITY}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_engine_heap_stays_flat_over_new_batch_shapes(tmp_path: Path) -> None:
    # measured: +0.4 MiB bounded; +378 MiB with oneDNN's default 1024 entries per cache,
    # which the engine keeps when the user asks for them (the negative control)
    assert heap_growth_mib(tmp_path / "bounded") < 8
    default = "1024"
    assert heap_growth_mib(tmp_path / "default", LRU_CACHE_CAPACITY=default,
                           ONEDNN_PRIMITIVE_CACHE_CAPACITY=default) > 100

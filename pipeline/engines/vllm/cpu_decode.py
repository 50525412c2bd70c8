"""GLM's decode attention on the CPU (`decode_attention.c`), built with the system's C compiler.

A decode step attends one query per request over the paged KV cache. vLLM's CPU kernel reads
it one head at a time, a 4-16 KiB island per block (its "vec" layout), and waits on memory:
measured on 2 cores (AVX-512, 16 requests x ~200 keys, 12 layers of glm-small's shape, one
decode step's attention), vLLM 5.3-5.8 ms in bfloat16 (about 20 GB/s) and 5.9-7.6 ms in
float32; this kernel, which walks each request's blocks in order with every head of a block
at once, 2.4-3.7 ms and 4.2-6.7 ms. Steps with prompt rows keep vLLM's kernel (GLM's segments,
pipeline/engines/vllm/attention.py).

The kernel is compiled on first use (`cc -O3 -fopenmp`, AVX-512 flags) into a per-user cache
keyed by the source and flags, and loaded with ctypes; it runs on torch's OpenMP runtime
(same soname) with torch's thread count. Where it cannot be used (no AVX-512 or AVX512-BF16,
another KV layout, no compiler, `GLM_INFILL_CPU_KERNELS=0`) vLLM's kernel runs instead, with
one warning when a build failed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
OPT_OUT = "GLM_INFILL_CPU_KERNELS"
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
FLAGS = {torch.float32: AVX512, torch.bfloat16: [*AVX512, "-mavx512bf16", "-DGLM_BF16"]}
MAX_HEAD_DIM = MAX_BLOCK_SIZE = 256  # the C file's bounds
KV_LAYOUT = "vec"  # vLLM's CPU attention ISA whose cache layout the kernel reads


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU has the instructions the kernel needs for `dtype`."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported()
    return dtype == torch.float32 and torch.cpu._is_avx512_supported()


def cache_dir() -> Path:
    """Where built kernels are kept: `$XDG_CACHE_HOME/glm-infill` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "glm-infill"


def build(dtype: torch.dtype, directory: Path) -> Path:
    """The kernel for `dtype` as a shared library in `directory`, compiled unless already
    there. Raises `RuntimeError` with the compiler's first line of complaint."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *FLAGS[dtype]]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    library = directory / f"decode_attention-{str(dtype).removeprefix('torch.')}-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / library.name
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f"{compiler}: {err}") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"{compiler} failed: {lines[0] if lines else done.returncode}")
        os.replace(built, library)  # atomic: processes building at once each install a whole one
    return library


@functools.cache
def kernel(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The loaded kernel for `dtype`, or None where it cannot run here (see the module)."""
    if os.environ.get(OPT_OUT, "1") == "0" or not cpu_supports(dtype):
        return None
    try:
        library = ctypes.CDLL(str(build(dtype, cache_dir())))
    except (OSError, RuntimeError) as err:
        log.warning("GLM decode attention kernel unavailable, using vLLM's: %s", err)
        return None
    function = library.glm_decode_attention
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, pointer, pointer, size, pointer, pointer, size,
                         size, size, size, size, ctypes.c_int32]
    function.restype = None
    return function


def cache_shape(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Blocks, heads, block size and head_dim of a layer's cache as vLLM's CPU backend holds
    it: [blocks, heads, block_size, 2 * head_dim] (its memory K^T then V per block and head)."""
    blocks, heads, block_size, doubled = kv_cache.shape
    return blocks, heads, block_size, doubled // 2


def usable(query: torch.Tensor, kv_cache: torch.Tensor, isa: str) -> bool:
    """Whether the kernel can run this layer's decode step (else vLLM's kernel does)."""
    _, _, block_size, head_dim = cache_shape(kv_cache)
    return (isa == KV_LAYOUT and query.device.type == "cpu" and kv_cache.dtype == query.dtype
            and kv_cache.is_contiguous() and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM
            and block_size % 16 == 0 and block_size <= MAX_BLOCK_SIZE
            and kernel(query.dtype) is not None)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, output: torch.Tensor) -> None:
    """Write each request's attention into `output`: `query` and `output` [requests, heads,
    head_dim] (rows may be strided, heads contiguous), `kv_cache` one layer's cache as vLLM
    holds it (`cache_shape`) in the "vec" layout, `block_table` [requests, n] and `seq_lens`
    [requests] int32. The keys are already divided by sqrt(head_dim)."""
    requests, heads, head_dim = query.shape
    for rows in (query, output):
        if rows.stride(2) != 1 or rows.stride(1) != head_dim:
            raise ValueError("query and output need contiguous heads")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_table and seq_lens must be int32")
    if block_table.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_table rows and seq_lens must be contiguous")
    kernel(query.dtype)(
        query.data_ptr(), query.stride(0), kv_cache.data_ptr(), block_table.data_ptr(),
        block_table.stride(0), seq_lens.data_ptr(), output.data_ptr(), output.stride(0),
        requests, heads, head_dim, cache_shape(kv_cache)[2], torch.get_num_threads())

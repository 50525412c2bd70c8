"""GLM's decode steps on the CPU (`cpu_decode.c`), built with the system's C compiler.

A decode step computes one row per request and reads a lot for it: every weight, and each
request's whole KV cache. Both reads are what these kernels do better than vLLM's CPU ones.

* Attention (`decode_attention`): vLLM's kernel reads the paged cache one head at a time, a
  4-16 KiB island per block (its "vec" layout), and waits on memory. This one walks each
  request's blocks in order, every head of a block while that head's K and V (side by side)
  are read once. One decode step's attention, glm-small's shape (16 requests x ~200 keys,
  12 layers, 2 cores, AVX-512): bfloat16 5.3-5.8 -> 2.4-3.7 ms, float32 5.9-7.6 ->
  4.2-6.7 ms. Steps with prompt rows keep vLLM's kernel (GLM's segments, attention.py).
* Linear layers (`decode_linear`): oneDNN's GEMM at 16 rows streams the weights at about 30
  GB/s. This one reads a second copy of each weight packed in panels of 16 outputs
  (`pack_linear`), each thread its panels end to end, prefetched ahead, every weight vector
  feeding 16 FMAs (bfloat16: dot products of pairs): glm-small's four layer shapes x 12
  layers at 16 rows, float32 11.2 -> 7.9 ms, bfloat16 6.1 -> 4.7 ms; up to 64 rows in
  passes of 16 over each panel while it is in cache (32 rows: float32 16.1 -> 13.6 ms,
  bfloat16 8.2 -> 7.0; 64 rows: on par with oneDNN). The copy costs the
  weights' memory again, so the model keeps it only while it is at most
  `DECODE_LINEAR_MAX_BYTES` per rank (glm-large: 1.2 GiB in float32; not glm-2b or
  glm-10b), for steps of at most `MAX_ROWS` rows; larger steps keep oneDNN.
* A whole block (`DecodeBlock`): where a block's weights have their packed copies, a decode
  step runs each GLM block as one call (LayerNorm, QKV, K and V stored in the paged cache,
  attention, dense, residual, LayerNorm, MLP with erf GELU, residual) in the model's order
  and roundings, instead of about twenty torch ops whose Python and dispatch cost 2.4-2.7 ms
  of a 16-row step: the step's forward float32 17.3 -> 15.8 ms, bfloat16 10.4 -> 8.8 ms.

The kernels are compiled on first use (`cc -O3 -fopenmp`, AVX-512 flags) into a per-user
cache keyed by the source and flags, loaded with ctypes, and run on torch's OpenMP runtime
(the same soname) with torch's thread count. Where they cannot be used (no AVX-512 or
AVX512-BF16, another KV layout, no compiler: one warning; `GLM_INFILL_CPU_KERNELS=0`) vLLM's
kernels run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
OPT_OUT = "GLM_INFILL_CPU_KERNELS"
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
FLAGS = {torch.float32: AVX512, torch.bfloat16: [*AVX512, "-mavx512bf16", "-DGLM_BF16"]}
MAX_HEAD_DIM = MAX_BLOCK_SIZE = 256  # the C file's bounds
MAX_ROWS = 64  # most rows of a decode_linear or DecodeBlock call (the C file's MAX_ROWS)
DECODE_LINEAR_MAX_BYTES = 2 * 1024**3  # a second copy of the linear weights, per rank
KV_LAYOUT = "vec"  # vLLM's CPU attention ISA whose cache layout the kernel reads


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU has the instructions the kernels need for `dtype`."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported()
    return dtype == torch.float32 and torch.cpu._is_avx512_supported()


def cache_dir() -> Path:
    """Where built kernels are kept: `$XDG_CACHE_HOME/glm-infill` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "glm-infill"


def build(dtype: torch.dtype, directory: Path) -> Path:
    """The kernels for `dtype` as a shared library in `directory`, compiled unless already
    there. Raises `RuntimeError` with the compiler's first line of complaint."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
             *FLAGS[dtype]]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    library = directory / f"cpu_decode-{str(dtype).removeprefix('torch.')}-{key}.so"
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


class BlockParameters(ctypes.Structure):
    """The C file's `struct glm_block`: where one block's parameters are, and its sizes."""

    _fields_ = [*((name, ctypes.c_void_p) for name in (
        "input_norm_weight", "input_norm_bias", "qkv_weight", "qkv_bias", "dense_weight",
        "dense_bias", "post_norm_weight", "post_norm_bias", "h_to_4h_weight", "h_to_4h_bias",
        "four_h_to_h_weight", "four_h_to_h_bias")),
        ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
        ("eps", ctypes.c_float)]


@functools.cache
def kernel(dtype: torch.dtype) -> ctypes.CDLL | None:
    """The loaded kernels for `dtype`, or None where they cannot run here (see the module)."""
    if os.environ.get(OPT_OUT, "1") == "0" or not cpu_supports(dtype):
        return None
    try:
        library = ctypes.CDLL(str(build(dtype, cache_dir())))
    except (OSError, RuntimeError) as err:
        log.warning("GLM's CPU decode kernels unavailable, using vLLM's: %s", err)
        return None
    pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    library.glm_decode_attention.argtypes = [pointer, size, pointer, pointer, size, pointer,
                                             pointer, size, size, size, size, size, threads]
    library.glm_decode_linear.argtypes = [pointer, size, pointer, pointer, pointer, size, size,
                                          size, size, pointer, threads]
    library.glm_decode_block.argtypes = [ctypes.POINTER(BlockParameters), pointer, size, pointer,
                                         pointer, size, pointer, pointer, size, pointer, threads]
    for function in (library.glm_decode_attention, library.glm_decode_linear,
                     library.glm_decode_block):
        function.restype = None
    return library


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


def _check_cache_inputs(block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_table and seq_lens must be int32")
    if block_table.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_table rows and seq_lens must be contiguous")


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
    _check_cache_inputs(block_table, seq_lens)
    kernel(query.dtype).glm_decode_attention(
        query.data_ptr(), query.stride(0), kv_cache.data_ptr(), block_table.data_ptr(),
        block_table.stride(0), seq_lens.data_ptr(), output.data_ptr(), output.stride(0),
        requests, heads, head_dim, cache_shape(kv_cache)[2], torch.get_num_threads())


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """An [out, in] weight as `decode_linear` reads it: float32 [out / 16, in, 16], bfloat16
    [out / 16, in / 2, 16, 2] (pairs of inputs, as AVX512-BF16's dot product takes them)."""
    out_features, in_features = weight.shape
    panels = weight.detach().reshape(out_features // 16, 16, in_features)
    if weight.dtype == torch.bfloat16:
        return panels.reshape(out_features // 16, 16, in_features // 2, 2).transpose(1, 2) \
            .contiguous()
    return panels.transpose(1, 2).contiguous()


def linear_packable(weight: torch.Tensor) -> bool:
    """Whether `decode_linear` can serve this weight (float32 or bfloat16 on a CPU that has
    the kernel; outputs a multiple of 16, inputs of 2)."""
    return (weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0
            and kernel(weight.dtype) is not None)


_scratch = threading.local()  # per calling thread and dtype: the kernels' work memory


def decode_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """x [rows <= MAX_ROWS, in] (rows contiguous) times the packed weight, plus bias; x,
    the weight and the bias of one dtype."""
    rows, in_features = x.shape
    panels = packed.shape[0]
    if rows > MAX_ROWS or x.stride(1) != 1 or x.dtype != packed.dtype:
        raise ValueError(f"decode_linear takes up to {MAX_ROWS} rows of the weight's dtype")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError("the bias must be contiguous, in the weight's dtype")
    scratch = _buffer(x.dtype, in_features * MAX_ROWS)  # x transposed
    out = torch.empty(rows, panels * 16, dtype=x.dtype)
    kernel(x.dtype).glm_decode_linear(
        x.data_ptr(), x.stride(0), packed.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(),
        out.stride(0), rows, panels * 16, in_features, scratch.data_ptr(),
        torch.get_num_threads())
    return out


def _buffer(dtype: torch.dtype, elements: int) -> torch.Tensor:
    """This thread's scratch memory for the kernels, grown as needed."""
    buffers = _scratch.__dict__
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < elements:
        buffer = buffers[dtype] = torch.empty(elements, dtype=dtype)
    return buffer


class DecodeBlock:
    """One GLM block of a decode step in one kernel call (`glm_decode_block`): LayerNorm, QKV,
    K and V stored in the paged cache, attention, dense, residual, LayerNorm, h -> 4h, GELU,
    4h -> h, residual, in GLMBlock's order and roundings, where the torch path makes about
    twenty op calls (each ~10 us of Python and dispatch on a 16-row step)."""

    def __init__(self, norms: tuple[torch.nn.LayerNorm, torch.nn.LayerNorm],
                 linears: list[tuple[torch.Tensor, torch.Tensor]], heads: int, head_dim: int):
        """`norms`: input and post-attention LayerNorm; `linears`: (packed weight, bias) of
        QKV (K's rows already divided by sqrt(head_dim)), dense, h -> 4h and 4h -> h."""
        hidden = norms[0].weight.numel()
        self.dtype = norms[0].weight.dtype
        self.hidden = hidden
        self.tensors = [t.detach().contiguous() for pair in (
            (norms[0].weight, norms[0].bias), *linears[:2], (norms[1].weight, norms[1].bias),
            *linears[2:]) for t in pair]
        self.parameters = BlockParameters(*(t.data_ptr() for t in self.tensors), hidden, heads,
                                          head_dim, norms[0].eps)

    @staticmethod
    def fits(hidden: int, heads: int, head_dim: int) -> bool:
        """Whether the kernel takes a block of these sizes (one rank holding every head)."""
        return hidden % 16 == 0 and heads * head_dim == hidden

    def __call__(self, x: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [requests <= MAX_ROWS, hidden] (contiguous, updated in place and returned),
        one row per request; the layer's cache as `decode_attention` takes it, `slots` int64
        where each row's K and V go."""
        rows = x.shape[0]
        if rows > MAX_ROWS or not x.is_contiguous() or x.dtype != self.dtype:
            raise ValueError(f"a decode block takes up to {MAX_ROWS} contiguous rows of "
                             "its dtype")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.numel() < rows:
            raise ValueError("slots must be contiguous int64, one per row")
        if kv_cache.dtype != self.dtype or not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be contiguous, in the block's dtype")
        _check_cache_inputs(block_table, seq_lens)
        work = _buffer(self.dtype, rows * 10 * self.hidden + 4 * self.hidden * MAX_ROWS)
        kernel(self.dtype).glm_decode_block(
            ctypes.byref(self.parameters), x.data_ptr(), rows, kv_cache.data_ptr(),
            block_table.data_ptr(), block_table.stride(0), seq_lens.data_ptr(),
            slots.data_ptr(), cache_shape(kv_cache)[2], work.data_ptr(),
            torch.get_num_threads())
        return x

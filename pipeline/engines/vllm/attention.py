"""GLM's attention inside vLLM as one registered op, `torch.ops.glm_infill.attention`.

GLM's mask: key j is visible to query i iff block_j = 0 (the context), or block_i > 0 and
j <= i. For every row but a context row (block 0) that is plain causal attention over the
request's whole sequence, cached keys included; a context row reads the context [0, P) and
nothing else, bidirectionally. So a step is split into segments, one or two per request:
the context rows among its new tokens (non-causal over keys [0, P)) and the rest (causal).
Context rows are a prefix of a request's new tokens, since the context comes first in every
prompt and a generated token always has a block position above 0.

* CPU: vLLM's CPU attention kernel takes a causal flag per request (`dynamic_causal`), so
  the segments are passed to it as requests of their own that share their request's block
  table row: one kernel call for the whole step, nothing computed twice, and the context's
  keys may come from the paged cache (prefix caching works: the engine salts every request
  with its context, because a context token's K/V depend on the whole context).
* Elsewhere (CUDA): vLLM's backend computes causal attention for every row, then the context
  rows of whole prompts are recomputed in one padded batch from this step's keys (prefix
  caching must be off there).

A step of decodes only (every request one new token) is plain causal attention: vLLM's
(which keeps it inside full CUDA graphs), or on the CPU our decode kernel over the same paged
cache, which reads it as one stream (`cpu_decode`). Being an op, the Python here is opaque to
torch.compile: the model compiles around it and the op splits piecewise CUDA graphs like
vLLM's own attention op (`SPLITTING_OPS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.library import Library
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from pipeline.engines.vllm import cpu_decode
from pipeline.glm.modeling import attend

LIBRARY = Library("glm_infill", "FRAGMENT")  # the op lives as long as this object
SPLITTING_OPS = ["glm_infill::attention"]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Segments:
    """A step's rows as segments: `starts` [S + 1] row offsets, `keys` [S] keys each segment
    reads (from the start of its request), `causal` [S] (int32 1 or 0), `request` [S] the
    request each belongs to."""

    starts: torch.Tensor
    keys: torch.Tensor
    causal: torch.Tensor
    request: torch.Tensor


def reads_paged_cache(device_type: str) -> bool:
    """Whether the op reads a context from the paged cache (the CPU kernel path), so that
    prefix caching may be on."""
    return device_type == "cpu"


def context_rows(block: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """How many of each request's new tokens are context rows (block position 0)."""
    requests = query_start_loc.numel() - 1
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    owner = torch.repeat_interleave(torch.arange(requests, device=block.device), lengths)
    counts = torch.zeros(requests, dtype=torch.int32, device=block.device)
    return counts.index_add_(0, owner, (block[:owner.numel()] == 0).to(torch.int32))


def split_segments(block: torch.Tensor, query_start_loc: torch.Tensor,
                   seq_lens: torch.Tensor) -> Segments:
    """Each request's context rows (keys: the context) and its other rows (causal)."""
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    cached = seq_lens - (ends - starts)
    context = context_rows(block, query_start_loc)
    bounds = torch.stack([starts, starts + context], 1).flatten()
    keys = torch.stack([cached + context, seq_lens], 1).flatten()
    causal = torch.tensor([0, 1], dtype=torch.int32, device=block.device).repeat(starts.numel())
    request = torch.arange(starts.numel(), device=block.device).repeat_interleave(2)
    kept = torch.stack([context > 0, ends > starts + context], 1).flatten()
    offsets = torch.cat([bounds[kept], ends[-1:]]).to(query_start_loc.dtype)
    return Segments(offsets, keys[kept].to(seq_lens.dtype), causal[kept], request[kept])


def _cpu_metadata(metadata, segments: Segments, layer, dtype: torch.dtype):
    """vLLM's CPU attention metadata with the segments as its requests."""
    from vllm import _custom_ops as ops
    from vllm import envs

    impl = layer.impl
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=segments.keys.numel(), num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size, seq_lens=segments.keys,
        dtype=dtype,
        query_start_loc=segments.starts, causal=False, sliding_window_size=-1,
        isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=segments.causal, kv_cache_dtype=impl.kv_cache_dtype)
    return dataclasses.replace(
        metadata, query_start_loc=segments.starts, seq_lens=segments.keys,
        block_table=metadata.block_table[segments.request],
        max_seq_len=int(segments.keys.max()), scheduler_metadata=scheduler, causal=False,
        dynamic_causal=segments.causal)


def recompute_context_rows(output: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, segments: Segments) -> None:
    """Overwrite the context rows of whole prompts with attention over their context, in one
    padded batch and the hub's numerics (`pipeline/glm/modeling.py`); tensors [tokens, heads,
    head_dim], keys already divided by sqrt(head_dim)."""
    context = segments.causal == 0
    if not bool(context.any()):
        return
    starts = segments.starts[:-1][context].long()
    lengths = segments.keys[context].long()
    if bool((segments.starts[1:][context].long() - starts != lengths).any()):
        raise RuntimeError("a prompt's context was partly cached: GLM on this device needs "
                           "prefix caching and chunked prefill off")
    width = int(lengths.max())
    offsets = torch.arange(width, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # [prompts, width]
    rows = torch.where(valid, starts[:, None] + offsets[None, :], starts[:, None])
    q, k, v = (t[rows].transpose(1, 2) for t in (query, key, value))  # [prompts, heads, w, d]
    attended = attend(q, k, v, ~valid[:, None, None, :]).transpose(1, 2)
    output[rows[valid]] = attended[valid]


def _cpu_kernels_read(layer, rows: torch.Tensor) -> bool:
    """Whether `cpu_decode`'s kernels can read this layer's cache for these rows (its
    layout, an unquantized cache of their dtype, a CPU that has the kernels)."""
    return layer.impl.kv_cache_dtype == "auto" and cpu_decode.usable(
        rows, layer.kv_cache, getattr(layer, "isa", ""))


def glm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  output: torch.Tensor, block: torch.Tensor, layer_name: str) -> None:
    """GLM-masked paged attention of one layer for the whole step, written into `output`;
    `key` and `value` of the new tokens are stored in the layer's KV cache first."""
    context = get_forward_context()
    metadata = context.attn_metadata
    if metadata is None:  # profiling and warm-up runs without requests
        return
    if isinstance(metadata, list):
        raise NotImplementedError("GLM attention does not support micro-batching")
    metadata = metadata[layer_name]
    layer = context.no_compile_layers[layer_name]
    impl = layer.impl
    heads = (-1, impl.num_heads, impl.head_size)
    query, key, value, output = (t.view(heads) for t in (query, key, value, output))
    slots = context.slot_mapping.get(layer_name)
    if slots is not None and not layer.attn_backend.forward_includes_kv_cache_update:
        impl.do_kv_cache_update(layer, key, value, layer.kv_cache, slots)
    if metadata.max_query_len == 1:  # decodes only: causal attention is GLM's pattern
        if _cpu_kernels_read(layer, query):
            requests = metadata.seq_lens.numel()
            cpu_decode.decode_attention(query[:requests], layer.kv_cache, metadata.block_table,
                                        metadata.seq_lens, output[:requests])
        else:
            impl.forward(layer, query, key, value, layer.kv_cache, metadata, output=output)
        return
    tokens = metadata.num_actual_tokens
    if reads_paged_cache(query.device.type):
        glm_metadata = _STEP.get(metadata, lambda: _cpu_metadata(
            metadata, split_segments(block[:tokens], metadata.query_start_loc,
                                     metadata.seq_lens), layer, query.dtype))
        impl.forward(layer, query, key, value, layer.kv_cache, glm_metadata, output=output)
    else:
        impl.forward(layer, query, key, value, layer.kv_cache, metadata, output=output)
        segments = split_segments(block[:tokens], metadata.query_start_loc, metadata.seq_lens)
        recompute_context_rows(output[:tokens], query[:tokens], key[:tokens], value[:tokens],
                               segments)


def decode_step(layer_name: str, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The layer's KV cache, block table, sequence lengths and slots when this step is decodes
    only, one row of `x` per request, with the cache in the layout of `cpu_decode`'s kernels,
    which then store K and V themselves; else None (the op does the step)."""
    context = get_forward_context()
    if not isinstance(context.attn_metadata, dict):  # warm-up runs; micro-batching
        return None
    metadata = context.attn_metadata[layer_name]
    layer = context.no_compile_layers[layer_name]
    slots = context.slot_mapping.get(layer_name)
    if (metadata.max_query_len != 1 or slots is None or metadata.seq_lens.numel() != x.shape[0]
            or layer.attn_backend.forward_includes_kv_cache_update
            or not _cpu_kernels_read(layer, x)):
        return None
    return layer.kv_cache, metadata.block_table, metadata.seq_lens, slots


class _StepCache:
    """What one step's layers share, worked out by the first layer: every layer gets the
    same attention metadata object for a step (one KV-cache group), and vLLM's CPU backend
    builds a new one every step (other backends may reuse theirs: not cached there)."""

    def __init__(self) -> None:
        self._metadata: object = None
        self._value: object = None

    def get(self, metadata: object, make: Callable[[], T]) -> T:
        if metadata is not self._metadata:
            self._metadata, self._value = metadata, make()
        return self._value  # type: ignore[return-value]


_STEP = _StepCache()


def _glm_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        output: torch.Tensor, block: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op("attention", glm_attention, mutates_args=["output"],
                          fake_impl=_glm_attention_fake, target_lib=LIBRARY)

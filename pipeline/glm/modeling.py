"""The GLM network in plain PyTorch, equal to the hub `modeling_glm.py` (docs/glm.md, "Network").

Modules mirror the checkpoint's key tree, so `load_state_dict` needs no name mapping. The
attention keeps a preallocated key/value cache instead of the hub's `mems` (the residual
streams): caching K and V of the LayerNorm'd memory is the same computation done once.
Numerics follow the hub exactly: K divided by sqrt(head_dim) before Q K^T, scores multiplied by
the 0/1 mask then -65504 added where masked, softmax in the compute dtype, erf GELU,
LayerNorm eps 1e-5, logits tied to the word embedding.

For inference on a CPU, `GLMModel.prepack` puts the linear layers' weights in oneDNN's blocked
layout: oneDNN then runs them at 2-3x the GFLOP/s of `F.linear` (MKL) in float32 (1.2-2x in
bfloat16, which F.linear already runs on oneDNN, repacking the weight every call).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.glm.checkpoint import LAYER_NORM_EPS, GLMConfig, load_config, load_state_dict

MASK_FILL = -65504.0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """`F.linear`, then erf GELU if `gelu`; on oneDNN when `weight` was prepacked for it
    (`prepacked`). In float32 oneDNN applies the GELU to each output tile while it is in cache
    (bit for bit the same values, one pass less over the widest activation); in other dtypes
    it would apply it before rounding, which upstream does after, so there it stays apart."""
    if not weight.is_mkldnn:
        y = F.linear(x, weight, bias)
    elif gelu and weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    else:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.gelu(y) if gelu else y


def prepacked(weight: torch.Tensor) -> torch.Tensor:
    """A copy of an [out, in] weight in oneDNN's blocked layout, for inference only."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class Linear(nn.Linear):
    """nn.Linear whose weight may be prepacked for oneDNN (`GLMModel.prepack`)."""

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gelu)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor
           ) -> torch.Tensor:
    """The hub's masked attention of queries over keys already divided by sqrt(head_dim);
    `masked` is True where a query may not attend (broadcast over the scores)."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    # bit for bit the hub's `scores * mask + MASK_FILL * (1 - mask)`: x * 1 + -0 = x and
    # x * 0 + MASK_FILL = MASK_FILL, in one pass instead of four
    scores = scores.masked_fill(masked, MASK_FILL)
    return torch.matmul(F.softmax(scores, dim=-1), v)


class KVCache:
    """Keys (already divided by sqrt(head_dim)) and values of every layer for a batch, in fixed
    slots; `length` slots are used."""

    def __init__(self, config: GLMConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (config.num_layers, batch, config.num_attention_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v after the used slots; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def rows(self, rows: slice) -> KVCache:
        """These batch rows as a cache of their own that writes into this one's storage (to
        fill it a few rows at a time); its `length` is its own."""
        part = copy.copy(self)
        part.keys, part.values = self.keys[:, rows], self.values[:, rows]
        return part

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, masked: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.query_key_value(x).split(h, dim=-1))
        # the hub's operation order, not an equivalent one: it decides float32 rounding. K is
        # divided before Q K^T, elementwise, so each key is divided once, as it is cached
        k = k / math.sqrt(self.head_dim)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        context = attend(q, k, v, masked)
        return self.dense(context.transpose(1, 2).reshape(b, s, h))


class GLMMLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.dense_h_to_4h(x, gelu=True))  # exact erf GELU (hub)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attention = GLMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = GLMMLP(config)

    def forward(self, x: torch.Tensor, masked: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), masked, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMTransformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        rows = config.position_table_rows
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.block_position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)


class GLMModel(nn.Module):
    """GLM with tied output logits: `forward` maps ids + 2D positions + mask to logits."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMTransformer(config)
        self.logits_weight: torch.Tensor | None = None  # set by `prepack`

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> GLMModel:
        config = load_config(model_dir)
        if not config.block_position_encoding:
            raise ValueError(f"{model_dir}: GLM infilling needs block_position_encoding=true")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(load_state_dict(model_dir, config, dtype), assign=True)
        return model.to(device).eval()

    def prepack(self) -> None:
        """Put the weights of every linear layer and of the tied logits in oneDNN's layout, for
        inference on a CPU. The packed layers have no autograd and no longer move to a device;
        the logits get a packed copy of the word embedding (which the input lookup keeps)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight = nn.Parameter(prepacked(module.weight), requires_grad=False)
        self.logits_weight = prepacked(self.word_embeddings.weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [b, s]; position_ids [b, 2, s] (position, block position);
        mask [b, s, keys] with 1 where a query may attend (keys = cached + s); -> logits."""
        t = self.transformer
        x = (self.word_embeddings(input_ids)
             + t.position_embeddings(position_ids[:, 0])
             + t.block_position_embeddings(position_ids[:, 1]))
        masked = (mask == 0).unsqueeze(1)  # [b, 1, s, keys], True = may not attend
        for i, block in enumerate(t.layers):
            x = block(x, masked, cache, i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        tied = self.word_embeddings.weight if self.logits_weight is None else self.logits_weight
        return linear(t.final_layernorm(x), tied)


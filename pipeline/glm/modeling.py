"""The GLM network in plain PyTorch, equal to the hub `modeling_glm.py` (docs/glm.md, "Network").

Modules mirror the checkpoint's key tree, so `load_state_dict` needs no name mapping. The
attention keeps a preallocated key/value cache instead of the hub's `mems` (the residual
streams): caching K and V of the LayerNorm'd memory is the same computation done once.
Numerics follow the hub exactly: K^T divided by sqrt(head_dim) before Q K^T, scores multiplied by
the 0/1 mask then -65504 added where masked, softmax in the compute dtype, erf GELU,
LayerNorm eps 1e-5, logits tied to the word embedding.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.glm.checkpoint import LAYER_NORM_EPS, GLMConfig, load_config, load_state_dict

MASK_FILL = -65504.0


class KVCache:
    """Keys and values of every layer for a batch, in fixed slots; `length` slots are used."""

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

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.query_key_value(x).split(h, dim=-1))
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # the hub's operation order, not an equivalent one: it decides float32 rounding
        scores = torch.matmul(q, k.transpose(-1, -2) / math.sqrt(self.head_dim))
        mask = mask.unsqueeze(1).to(scores.dtype)  # [b, 1, s, keys], 1 = may attend
        scores = scores * mask + MASK_FILL * (1.0 - mask)
        context = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.dense(context.transpose(1, 2).reshape(b, s, h))


class GLMMLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact erf GELU (hub)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attention = GLMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = GLMMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), mask, cache, layer)
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

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [b, s]; position_ids [b, 2, s] (position, block position);
        mask [b, s, keys] with 1 where a query may attend (keys = cached + s); -> logits."""
        t = self.transformer
        x = (self.word_embeddings(input_ids)
             + t.position_embeddings(position_ids[:, 0])
             + t.block_position_embeddings(position_ids[:, 1]))
        for i, block in enumerate(t.layers):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return F.linear(t.final_layernorm(x), self.word_embeddings.weight)


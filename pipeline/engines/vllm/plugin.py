"""vLLM plugin: GLM under a model type of our own (`vllm.general_plugins` entry point).

transformers 5 owns `model_type: "glm"` (GLM-4), so the engine presents a GLM checkpoint to
vLLM through a derived config (`glm_infill`, written by `derived_config`) while the weights are
read from the untouched checkpoint directory. vLLM calls `register` in every process it starts;
it must stay cheap and idempotent.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pipeline.glm.checkpoint import GLMConfig

MODEL_TYPE = "glm_infill"
ARCHITECTURE = "GLMInfillForCausalLM"
MODEL_CLASS = "pipeline.engines.vllm.model:GLMInfillForCausalLM"


class GLMInfillConfig(PretrainedConfig):
    """GLM's hub fields under our model type, plus the names vLLM reads (layers, heads, ...)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, num_layers: int = 24, hidden_size: int = 1024,
                 num_attention_heads: int = 16, vocab_size: int = 30592, **kwargs: Any):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.vocab_size = vocab_size
        self.head_dim = hidden_size // num_attention_heads
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)


# vLLM would read `max_sequence_length` as the model's length limit, but GLM's limit is on
# positions, not on context + answers: the derived config keeps it under another name.
RENAMED = {"max_sequence_length": "glm_max_sequence_length"}


def derived_config(config: GLMConfig, max_model_len: int) -> dict:
    """config.json for vLLM: our model type, and the M-RoPE hook that carries 2D positions.

    `rope_parameters.mrope_section` only switches on vLLM's multi-dimensional position path
    (per-request prompt positions + a decode delta); the model applies no rotary embedding.
    """
    fields = {RENAMED.get(k, k): v for k, v in config.to_dict().items()}
    return {
        **fields,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "max_position_embeddings": max_model_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [1, 1, 1]},
        "tie_word_embeddings": True,
        "torch_dtype": config.torch_dtype or "float32",
    }


def glm_config(hf_config: PretrainedConfig) -> GLMConfig:
    """The GLMConfig a derived config was written from."""
    return GLMConfig(**{name: getattr(hf_config, RENAMED.get(name, name))
                        for name in GLMConfig.__dataclass_fields__
                        if hasattr(hf_config, RENAMED.get(name, name))})


def register() -> None:
    """Make `glm_infill` known to transformers' AutoConfig and our model known to vLLM."""
    from vllm import ModelRegistry

    AutoConfig.register(MODEL_TYPE, GLMInfillConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)

"""Engine factory: the same `SpanEngine` interface over the torch and vLLM back ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.infill import SpanEngine

ENGINES = ("torch", "vllm")


def make_engine(kind: str, model_dir: str | Path, dtype: str = "float32",
                device: str | None = None, **engine_options: Any) -> SpanEngine:
    """Build an engine; the vLLM one is imported lazily so the torch path needs no vLLM."""
    if kind == "torch":
        from pipeline.torch_engine import TorchEngine

        if engine_options:
            raise ValueError(f"the torch engine takes no options {sorted(engine_options)}")
        return TorchEngine(model_dir, dtype=dtype, device=device)
    if kind == "vllm":
        from pipeline.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, device=device, **engine_options)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")

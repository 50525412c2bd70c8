"""Engines that run GLM: the contract (`base`), the torch engine, and the vLLM engine (`vllm/`).

`make_engine` builds either from the same arguments; the vLLM engine is imported only when
asked for, so the torch path needs no vLLM. An engine that cannot start raises
`EngineStartError` (base.py), one line naming the cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.engines.base import (
    ENGINE_OPTIONS,
    EngineConfigError,
    EngineName,
    EngineOptions,
    InfillEngine,
    one_line,
)
from pipeline.glm.checkpoint import DType


def engine_options(name: EngineName | str, options: EngineOptions | dict[str, Any] | None
                   ) -> EngineOptions:
    """The engine's typed options from a dict (config, CLI) or an options object."""
    model = ENGINE_OPTIONS[EngineName(name)]
    if isinstance(options, model):
        return options
    if isinstance(options, EngineOptions):
        raise TypeError(f"{type(options).__name__} are not options of the {name} engine")
    return model.model_validate(options or {})


def make_engine(name: EngineName | str, model_dir: str | Path, dtype: DType | str = DType.FLOAT32,
                device: str | None = None, options: EngineOptions | dict[str, Any] | None = None,
                record_logits: bool = False) -> InfillEngine:
    """An engine over the checkpoint in `model_dir`. `record_logits` keeps every step's logits
    in the results (conformance checks; costs time and memory)."""
    name = EngineName(name)
    typed = engine_options(name, options)
    if name is EngineName.TORCH:
        from pipeline.engines.torch_engine import TorchEngine

        try:
            return TorchEngine(model_dir, DType(dtype), device, typed, record_logits)
        except (AssertionError, RuntimeError) as err:
            # torch refuses the device: no CUDA in this build, a name it does not know, too
            # little memory on it
            raise EngineConfigError(f"the torch engine did not start on device {device!r}: "
                                    f"{one_line(err)}") from None
    from pipeline.engines.vllm.engine import VLLMEngine

    return VLLMEngine(model_dir, DType(dtype), device, typed, record_logits)

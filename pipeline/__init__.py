"""glm-infill: offline blank infilling with the original GLM models on Ray and vLLM.

Layers, imported one way only (docs/architecture.md): `pipeline.job` (the Ray batch job) ->
`pipeline.engines` (torch and vLLM engines) -> `pipeline.glm` (checkpoints, tokenizers, the
network, the multi-mask procedures). The SDK names are imported on first use, so
`import pipeline.glm.tokenization` (and every Ray worker) does not pay for Ray and torch up front.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InfillJob": "pipeline.job.runner",
    "JobFailed": "pipeline.job.runner",
    "InfrastructureError": "pipeline.job.runner",
    "JobInterrupted": "pipeline.job.runner",
    "JobResult": "pipeline.job.result",
    "ConfigError": "pipeline.job.config",
    "JobConfig": "pipeline.job.config",
    "load_config": "pipeline.job.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

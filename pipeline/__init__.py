"""glm-infill: offline blank infilling with the original GLM models on Ray and vLLM.

The SDK names are imported on first use, so `import pipeline.tokenization` (and every Ray
worker) does not pay for Ray, pyarrow and torch up front.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InfillJob": "pipeline.job",
    "JobFailed": "pipeline.job",
    "JobConfig": "pipeline.config",
    "load_config": "pipeline.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

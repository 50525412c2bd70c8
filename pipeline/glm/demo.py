"""The demo checkpoint: a small GLM with seeded random weights, so a job runs out of the box.

It answers with nonsense (random weights) but exercises every part of the pipeline with the
real GLM layout and tokenizer. It is rebuilt bit-for-bit from the seed on any machine, which
lets a worker that does not share the driver's disk create its own copy. The tokenizer files
ship inside the package (`pipeline/glm/demo_tokenizer/`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from pipeline.glm.checkpoint import GLMConfig, write_random_checkpoint

DEMO_NAME = "glm-infill-demo (random weights)"
DEMO_SEED = 0
DEMO_SHAPE = dict(num_layers=2, hidden_size=256, num_attention_heads=4,  # head dim 64 (vLLM)
                  max_sequence_length=512, vocab_size=1024, output_predict=True)


def default_demo_dir() -> Path:
    """Where the demo checkpoint is cached: `$XDG_CACHE_HOME/glm-infill/demo` (~/.cache)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "glm-infill" / "demo"


def write_demo_checkpoint(out_dir: Path, seed: int = DEMO_SEED, **shape: int) -> Path:
    """Write the demo GLM (or a smaller variant for tests) into `out_dir`."""
    config = GLMConfig(**{**DEMO_SHAPE, **shape})
    with resources.as_file(resources.files("pipeline.glm") / "demo_tokenizer") as tokenizer:
        write_random_checkpoint(out_dir, config, tokenizer, seed)
    raw = json.loads((out_dir / "config.json").read_text())
    raw["_name_or_path"] = DEMO_NAME
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out_dir


def ensure_demo_checkpoint(path: str | Path | None = None) -> Path:
    """The demo checkpoint directory, created once (atomically, so racing workers are safe)."""
    target = Path(path) if path is not None else default_demo_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""Shared test fixtures: the upstream conformance fixtures and tiny GLM checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import GLMConfig, random_state_dict, save_checkpoint
from pipeline.demo import TOKENIZER_FILES
from pipeline.tokenization import GLMTokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "glm-fixtures" / "public"
FIXTURE_MODEL = FIXTURES / "model"
FIXTURE_CASES = FIXTURES / "cases"
FIXTURE_MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def case_logits(case: dict, name: str) -> np.ndarray:
    return np.load(FIXTURE_CASES / case["name"] / f"{name}.npy")


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, fmt: str = "safetensors",
                         prefix: str = "", shards: int = 1, **shape: int) -> Path:
    """A random GLM with the fixture's sentencepiece tokenizer (head dim 64 by default)."""
    fields = dict(num_layers=2, hidden_size=128, num_attention_heads=2,
                  max_sequence_length=256, vocab_size=1024, output_predict=True)
    config = GLMConfig(**{**fields, **shape})
    save_checkpoint(random_state_dict(config, seed), config, out_dir, fmt, prefix, shards)
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE_MODEL / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer() -> GLMTokenizer:
    return load_tokenizer(FIXTURE_MODEL)


@pytest.fixture(scope="session")
def torch_engine():
    from pipeline.torch_engine import TorchEngine

    return TorchEngine(FIXTURE_MODEL)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-glm"))



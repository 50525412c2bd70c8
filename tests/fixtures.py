"""Shared test fixtures: the upstream conformance fixtures (`../shared`) and tiny checkpoints.

Tests that need `../shared/glm-fixtures` use the `shared_fixtures` marker fixture (or a fixture
built on it) and are skipped with a message when the folder is absent; collection never fails.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from pipeline.glm.checkpoint import GLMConfig, write_random_checkpoint
from pipeline.glm.tokenization import GLMTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "glm-fixtures" / "public"
FIXTURE_MODEL = FIXTURES / "model"
FIXTURE_CASES = FIXTURES / "cases"
DEMO_TOKENIZER = ROOT / "pipeline" / "glm" / "demo_tokenizer"
NO_SHARED = f"needs the upstream fixtures in {FIXTURES} (../shared beside the repository)"
needs_shared = pytest.mark.skipif(not FIXTURES.is_dir(), reason=NO_SHARED)
# the device of the conformance tests' torch model and engine (benchmarks/gpu_check.py: cuda)
TEST_DEVICE = os.environ.get("GLM_INFILL_TEST_DEVICE", "cpu")


@cache
def fixture_manifest() -> dict:
    """The fixtures' manifest ({} without ../shared, so that parametrization still collects)."""
    path = FIXTURES / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fixture_cases() -> list[dict]:
    return fixture_manifest().get("cases", [])


def case_logits(case: dict, name: str) -> np.ndarray:
    return np.load(FIXTURE_CASES / case["name"] / f"{name}.npy")


def spliced(text: str, answers: list[str]) -> str:
    """What `output_text` must be, found independently of the code under test: each mask
    token written in `text`, in order, replaced by the next answer."""
    remaining = iter(answers)
    return re.sub(r"\[[sg]?MASK\]", lambda _: next(remaining), text)


TINY_SHAPE = dict(num_layers=2, hidden_size=128, num_attention_heads=2,  # head dim 64 (vLLM)
                  max_sequence_length=256, vocab_size=1024, output_predict=True)


def make_tiny_checkpoint(out_dir: Path, seed: int = 0, edit=None, **overrides) -> Path:
    """A random GLM with the demo's sentencepiece tokenizer (shipped in the package, so no
    ../shared needed). `overrides` are GLMConfig fields or `save_checkpoint` options (fmt,
    prefix, shards); `edit` may change the weights before they are saved."""
    save_keys = {"fmt", "prefix", "shards"}
    save = {k: v for k, v in overrides.items() if k in save_keys}
    shape = {k: v for k, v in overrides.items() if k not in save_keys}
    config = GLMConfig(**{**TINY_SHAPE, **shape})
    return write_random_checkpoint(out_dir, config, DEMO_TOKENIZER, seed, edit=edit, **save)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The upstream fixture folder; skips the test when ../shared is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(NO_SHARED)
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer(shared_fixtures: Path) -> GLMTokenizer:
    return load_tokenizer(FIXTURE_MODEL)


@pytest.fixture(scope="session")
def demo_tokenizer() -> GLMTokenizer:
    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope="session")
def torch_engine(shared_fixtures: Path):
    """The fixture model on the torch engine, recording step logits (conformance)."""
    from pipeline.engines.torch_engine import TorchEngine

    return TorchEngine(FIXTURE_MODEL, device=TEST_DEVICE, record_logits=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-glm"))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-layout checkpoint smaller than the demo one, so jobs run fast on CPU."""
    from pipeline.glm.demo import write_random_demo_checkpoint

    return write_random_demo_checkpoint(tmp_path_factory.mktemp("small-glm"), num_layers=1,
                                 hidden_size=128, num_attention_heads=2,
                                 max_sequence_length=128)

"""Fixtures of the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.engines.vllm_helpers import EngineSlot


@pytest.fixture(scope="module")
def slot() -> Iterator[EngineSlot]:
    """One in-process vLLM engine at a time per module, closed at the module's end."""
    engines = EngineSlot()
    yield engines
    engines.close()

"""Shared benchmark workload: a random GLM in a given shape and a fixed seeded prompt set."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from pipeline.glm.checkpoint import DType, load_config, write_random_checkpoint
from pipeline.glm.tokenization import GLMTokenizer

BENCH_MODEL = Path(__file__).resolve().parents[2] / "shared" / "glm-fixtures" / "bench" / "model"
MASKS = ("[MASK]", "[sMASK]", "[gMASK]")


def bench_checkpoint(out_dir: Path, dtype: DType | str = DType.FLOAT32, seed: int = 0,
                     **shape_overrides: int) -> Path:
    """glm-small (shared/glm-fixtures/bench) with random weights; overrides rescale it."""
    config = dataclasses.replace(load_config(BENCH_MODEL), **shape_overrides)
    return write_random_checkpoint(out_dir, config, BENCH_MODEL, seed, DType(dtype))


def infill_texts(tokenizer: GLMTokenizer, count: int, seed: int = 0, min_tokens: int = 64,
                 max_tokens: int = 400, max_masks: int = 3) -> list[str]:
    """Seeded texts of about `min_tokens`..`max_tokens` tokens with 1..max_masks blanks.

    Blanks are [MASK] and [sMASK] anywhere, and [gMASK] only at the end (its meaning).
    """
    rng = random.Random(seed)
    vocabulary = ["the", "model", "reads", "context", "in", "both", "directions", "and",
                  "writes", "each", "answer", "left", "to", "right", "file", "data", "table",
                  "city", "river", "mode", "caller", "method", "sort", "value", "year", "北京",
                  "中国", "首都", "城市", "question", "general", "purpose", "language"]
    cost = {word: len(tokenizer.tokenize_ids(word)) for word in vocabulary}
    texts = []
    for _ in range(count):
        budget = rng.randint(min_tokens, max_tokens)
        masks = rng.randint(1, max_masks)
        words: list[str] = []
        while sum(cost[w] for w in words) + masks + 2 < budget:
            words.append(rng.choice(vocabulary))
        kinds = [rng.choice(MASKS[:2]) for _ in range(masks)]
        slots = sorted(rng.sample(range(1, len(words)), masks))
        if rng.random() < 0.3:
            kinds[-1], slots[-1] = "[gMASK]", len(words)
        for slot, kind in sorted(zip(slots, kinds, strict=True), reverse=True):
            words.insert(slot, kind)
        texts.append(" ".join(words))
    return texts

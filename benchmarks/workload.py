"""Shared benchmark workload: a random GLM in a given shape and a fixed seeded prompt set."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from pipeline.checkpoint import load_config, random_state_dict, save_checkpoint
from pipeline.demo import TOKENIZER_FILES
from pipeline.tokenization import GLMTokenizer
from pipeline.torch_engine import resolve_dtype

BENCH_MODEL = Path(__file__).resolve().parents[2] / "shared" / "glm-fixtures" / "bench" / "model"
MASKS = ("[MASK]", "[sMASK]", "[gMASK]")


def bench_checkpoint(out_dir: Path, dtype: str = "float32", seed: int = 0,
                     **shape_overrides: int) -> Path:
    """glm-small (shared/glm-fixtures/bench) with random weights; overrides rescale it."""
    config = load_config(BENCH_MODEL)
    config = type(config)(**{**config.__dict__, **shape_overrides})
    save_checkpoint(random_state_dict(config, seed, resolve_dtype(dtype)), config, out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(BENCH_MODEL / name, out_dir / name)
    return out_dir


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

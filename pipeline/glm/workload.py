"""Benchmark workloads: random GLMs in the shapes of the published models, and seeded infill
texts (`glm-infill bench`, benchmarks/).

The shapes are defined here, so a benchmark needs nothing beside the package: their
checkpoints get seeded random weights and the small tokenizer of `demo_tokenizer/` (ids below
1024, which every shape's vocabulary holds), and the texts are built from that tokenizer's
words. `glm-small` is the shape of the benchmark model in `shared/glm-fixtures/bench`: the
same seed gives the same weights.
"""

from __future__ import annotations

import random
from enum import StrEnum
from pathlib import Path

from pipeline.glm.checkpoint import DType, GLMConfig
from pipeline.glm.demo import RANDOM_SHAPE, write_random_demo_checkpoint
from pipeline.glm.tokenization import GMASK, MASK, SMASK, GLMTokenizer


class Shape(StrEnum):
    GLM_SMALL = "glm-small"
    GLM_LARGE = "glm-large"
    GLM_10B = "glm-10b"


SHAPES: dict[Shape, dict[str, int]] = {
    Shape.GLM_SMALL: dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                          max_sequence_length=512, vocab_size=1024),
    Shape.GLM_LARGE: dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                          max_sequence_length=512, vocab_size=30592),
    Shape.GLM_10B: dict(num_layers=48, hidden_size=4096, num_attention_heads=64,
                        max_sequence_length=1024, vocab_size=50304),
}
WORDS = ("the", "model", "reads", "context", "in", "both", "directions", "and", "writes", "each",
         "answer", "left", "to", "right", "file", "data", "table", "city", "river", "mode",
         "caller", "method", "sort", "value", "year", "北京", "中国", "首都", "城市", "question",
         "general", "purpose", "language")


def shape_config(shape: Shape | str) -> GLMConfig:
    """The GLM config of a named shape (as its random checkpoint has it)."""
    return GLMConfig(**{**RANDOM_SHAPE, **SHAPES[Shape(shape)]})


def write_shape_checkpoint(out_dir: Path, shape: Shape | str, dtype: DType | str = DType.FLOAT32,
                           seed: int = 0) -> Path:
    """A checkpoint of the named shape with seeded random weights in `dtype`."""
    return write_random_demo_checkpoint(out_dir, seed, DType(dtype), **SHAPES[Shape(shape)])


def infill_texts(tokenizer: GLMTokenizer, count: int, seed: int = 0, min_tokens: int = 64,
                 max_tokens: int = 400, max_masks: int = 3) -> list[str]:
    """Seeded texts of about `min_tokens`..`max_tokens` tokens with 1..max_masks blanks.

    Blanks are [MASK] and [sMASK] anywhere, and [gMASK] only at the end (its meaning).
    """
    rng = random.Random(seed)
    cost = {word: len(tokenizer.tokenize_ids(word)) for word in WORDS}
    texts = []
    for _ in range(count):
        budget = rng.randint(min_tokens, max_tokens)
        masks = rng.randint(1, max_masks)
        words: list[str] = []
        while sum(cost[w] for w in words) + masks + 2 < budget:
            words.append(rng.choice(WORDS))
        kinds = [rng.choice((MASK, SMASK)) for _ in range(masks)]
        slots = sorted(rng.sample(range(1, len(words)), masks))
        if rng.random() < 0.3:
            kinds[-1], slots[-1] = GMASK, len(words)
        for slot, kind in sorted(zip(slots, kinds, strict=True), reverse=True):
            words.insert(slot, kind)
        texts.append(" ".join(words))
    return texts


def _additive_costs(tokenizer: GLMTokenizer) -> dict[str, int]:
    """The words whose token count is the same wherever they stand (so counts add up), with
    that count."""
    costs = {word: len(tokenizer.tokenize_ids(word)) for word in WORDS}
    return {word: cost for word, cost in costs.items()
            if len(tokenizer.tokenize_ids(f"{word} {word}")) == 2 * cost}


def _words(rng: random.Random, costs: dict[str, int], budget: int) -> list[str]:
    """Seeded words of exactly `budget` tokens (one-token words fill the rest)."""
    words: list[str] = []
    while budget:
        word = rng.choice([w for w, cost in costs.items() if cost <= budget])
        words.append(word)
        budget -= costs[word]
    return words


def fixed_length_texts(tokenizer: GLMTokenizer, count: int, tokens: int, masks: int,
                       seed: int = 0) -> list[str]:
    """Seeded texts whose prompt is exactly `tokens` ids (the `[CLS]` and end tokens and the
    blanks included), with `masks` blanks ([MASK] and [sMASK], as the tokenizer has them)
    spread evenly over the text. Raises ValueError when the tokenizer cannot make them."""
    costs = _additive_costs(tokenizer)
    kinds = [name for name in tokenizer.mask_names.values() if name != GMASK]
    budget = tokens - masks - 2
    if budget < 0 or not kinds or 1 not in costs.values():
        raise ValueError(f"no text of {tokens} tokens with {masks} blanks: it needs at least "
                         f"{masks + 2} tokens, and a tokenizer with [MASK] and one-token words")
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = _words(rng, costs, budget)
        slots = [round((k + 0.5) * len(words) / masks) for k in range(masks)]
        for slot in reversed(slots):
            words.insert(slot, rng.choice(kinds))
        texts.append(" ".join(words))
    wrong = [len(ids) for ids in map(tokenizer.encode, texts) if len(ids) != tokens]
    if wrong:
        raise ValueError(f"texts meant to be {tokens} tokens are {wrong[0]}: this tokenizer's "
                         "word counts do not add up")
    return texts

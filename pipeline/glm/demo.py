"""The demo checkpoint, and random checkpoints in its layout for tests and benchmarks.

The demo GLM (`pipeline/glm/demo_model/`) is a small GLM trained from scratch by
`scripts/train_demo_model.py` on the synthetic world of `pipeline/glm/demo_world.py`: it fills
blanks in short English and Chinese stories about made-up people and nothing else. It ships
inside the package, so every Ray worker that imports `pipeline` has it. Its files are those of
a hub glm-*-chinese directory (`config.json`, safetensors weights, `cog-pretrain.model`,
`added_tokens.json`, tokenizer configs).

Random checkpoints (`write_random_demo_checkpoint`) use the small tokenizer in
`pipeline/glm/demo_tokenizer/`: tests and benchmarks build them in any shape.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pipeline.glm.checkpoint import DType, GLMConfig, write_random_checkpoint
from pipeline.glm.demo_world import KNOWS

DEMO_NAME = "glm-infill-demo"
RANDOM_SEED = 0
RANDOM_SHAPE = dict(num_layers=2, hidden_size=256, num_attention_heads=4,  # head dim 64
                    max_sequence_length=512, vocab_size=1024, output_predict=True)


def demo_checkpoint() -> Path:
    """The shipped demo checkpoint directory."""
    return Path(str(resources.files("pipeline.glm") / "demo_model"))


def demo_notice() -> str:
    """One line for users who run without a model: what the demo knows about."""
    return (f"using the demo GLM ({DEMO_NAME}, a few MB trained on a toy world: it only knows "
            f"{KNOWS}); give a checkpoint directory to use a real GLM")


def write_random_demo_checkpoint(out_dir: Path, seed: int = RANDOM_SEED,
                                 dtype: DType = DType.FLOAT32, **shape: int) -> Path:
    """A GLM with seeded random weights (bit-for-bit the same on any machine) in `dtype` and
    the small test tokenizer, in the given shape (default: two layers of 256)."""
    config = GLMConfig(**{**RANDOM_SHAPE, **shape})
    with resources.as_file(resources.files("pipeline.glm") / "demo_tokenizer") as tokenizer:
        return write_random_checkpoint(out_dir, config, tokenizer, seed, dtype)

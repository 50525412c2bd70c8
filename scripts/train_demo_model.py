"""Train the demo GLM from scratch on the CPU: the checkpoint in `pipeline/glm/demo_model/`.

    .venv/bin/python scripts/train_demo_model.py [--steps N] [--out DIR] [--threads T]

The world is `pipeline/glm/demo_world.py` (English and Chinese stories whose every blank is
determined by the rest of the text). The tokenizer is a sentencepiece model trained on that
world, laid out like glm-*-chinese (`cog-pretrain.model` + `added_tokens.json`). The objective
is GLM's own: Part A is the text with blanks made by the pipeline's own masking policies
(`span` -> `[MASK]`, `sentence` -> `[sMASK]`, `suffix` -> `[gMASK]`), encoded exactly as the
engines encode prompts; Part B holds the removed spans in random order, each
`<|startofpiece|> span` predicting `span <|endofpiece|>`, at position (blank position, 1..n);
Part A attends bidirectionally to itself, Part B causally to A and the earlier spans.

Everything is seeded: the same command with the same torch version and thread count gives the
same weights (float sums in other orders give other, equally good, weights). The
output directory gets the checkpoint; `--report-dir` (docs/demo-model/) gets `loss.png` and
`report.json` (steps, loss curve, held-out exact match per mask kind with each engine).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.glm.checkpoint import GLMConfig, random_state_dict, save_checkpoint  # noqa: E402
from pipeline.glm.demo_world import story  # noqa: E402
from pipeline.glm.modeling import GLMModel  # noqa: E402
from pipeline.glm.tokenization import GLMTokenizer, load_tokenizer  # noqa: E402
from pipeline.job.config import PromptConfig  # noqa: E402
from pipeline.job.policies import POLICIES, WORD, Policy  # noqa: E402

SEED = 1234
EVAL_SEED = 987654  # held-out stories: a different stream than training
SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=4,  # head dim 64 (vLLM)
             max_sequence_length=256, output_predict=True)
SP_PIECES = 1000
GLM_TOKENS = ["<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]",
              "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"]
SPECIAL_TOKENS_MAP = {
    "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "cls_token": "[CLS]",
    "mask_token": "[MASK]", "unk_token": "[UNK]", "sep_token": "[SEP]",
    "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"],
}
# The mask kinds in training, with the share of examples and the policy settings drawn per
# example (the pipeline's defaults lie inside these ranges).
KINDS = {
    Policy.SPAN: 0.4,
    Policy.SENTENCE: 0.3,
    Policy.SUFFIX: 0.3,
}


# -- tokenizer -------------------------------------------------------------------------
def write_tokenizer(out: Path, rng: random.Random) -> GLMTokenizer:
    """A sentencepiece BPE model of the world (every character of it, plus printable ASCII and
    Chinese punctuation so any text tokenizes), in the glm-*-chinese file layout."""
    import sentencepiece

    # Chinese is trained with a space between characters, so that every Han character is a
    # piece of its own and no piece joins a name to the word after it (names are copied).
    corpus = [" ".join(WORD.findall(story(rng)[1])) for _ in range(20000)]
    corpus.append("".join(chr(c) for c in range(33, 127)) + "，。？！：；、“”（）")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=SP_PIECES,
        model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
        split_digits=True, byte_fallback=False, minloglevel=2, num_threads=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cog-pretrain.model").write_bytes(model.getvalue())
    added = {token: SP_PIECES + i for i, token in enumerate(GLM_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    config = {**SPECIAL_TOKENS_MAP, "name_or_path": "glm-infill-demo",
              "add_prefix_space": False, "tokenizer_class": "GLMChineseTokenizer",
              "use_fast": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return load_tokenizer(out)


# -- examples --------------------------------------------------------------------------
def masked_example(rng: random.Random, text: str, index: int) -> tuple[str, list[str], Policy]:
    """The text with blanks made by one of the pipeline's policies, and what they removed."""
    policy = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    cfg = PromptConfig(
        policy=policy, seed=rng.randrange(2**31),
        span={"mask_ratio": rng.uniform(0.05, 0.3), "mean_length": rng.uniform(1.0, 4.0),
              "max_spans": rng.randint(1, 4)},
        sentence={"max_sentences": rng.choice([1, 1, 1, 2])},
        suffix={"keep_ratio": rng.uniform(0.15, 0.85)},
    )
    prompt, removed = POLICIES[policy]({"text": text}, cfg, "text", str(index))
    return prompt, removed, policy


def glm_example(tok: GLMTokenizer, rng: random.Random, index: int
                ) -> tuple[list[int], list[int], list[int], int, list[int]]:
    """(ids, positions, block positions, Part A length, targets with -100 where no loss)."""
    prompt, removed, policy = masked_example(rng, story(rng)[1], index)
    # iterative (the hub) ends every prompt with <|endoftext|>; sequential (THUDM's script)
    # leaves it out after a final [gMASK]: train on both
    ids = tok.encode(prompt) if rng.random() < 0.5 else tok.encode_original(prompt)
    masks = set(tok.mask_token_ids)
    blanks = [i for i, t in enumerate(ids) if t in masks]
    assert len(blanks) == len(removed), (prompt, removed)
    positions, blocks = list(range(len(ids))), [0] * len(ids)
    targets = [-100] * len(ids)
    context = len(ids)
    order = list(range(len(blanks)))
    rng.shuffle(order)
    for k in order:
        span = tok.tokenize_ids(removed[k])
        ids += [tok.sop_id, *span]
        targets += [*span, tok.eop_id]
        positions += [blanks[k]] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    return ids, positions, blocks, context, targets


def batch(examples: list[tuple], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(e[0]) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id)
    positions = torch.zeros((n, 2, width), dtype=torch.long)
    targets = torch.full((n, width), -100)
    mask = torch.zeros((n, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, (tokens, pos, block, context, target) in enumerate(examples):
        length = len(tokens)
        ids[i, :length] = torch.tensor(tokens)
        positions[i, 0, :length] = torch.tensor(pos)
        positions[i, 1, :length] = torch.tensor(block)
        targets[i, :length] = torch.tensor(target)
        mask[i, :length, :length] = causal[:length, :length]
        mask[i, :length, :context] = True  # Part A is visible to every row
    return ids, positions, mask, targets


# -- training --------------------------------------------------------------------------
def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model: GLMModel, out: Path) -> None:
    """The checkpoint files (weights in float16, like the hub's large checkpoints)."""
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(state, model.config, out)
    raw = json.loads((out / "config.json").read_text())
    raw["_name_or_path"] = "glm-infill-demo"
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def train(model: GLMModel, tok: GLMTokenizer, steps: int, batch_size: int, peak_lr: float,
          log_every: int, snapshots: Path | None = None) -> list[dict]:
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=peak_lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    curve, started, running = [], time.time(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=min(300, steps // 10))
        examples = [glm_example(tok, rng, step * batch_size + i) for i in range(batch_size)]
        ids, positions, mask, targets = batch(examples, tok.pad_id)
        logits = model(ids, positions, mask)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            point = {"step": step + 1, "loss": sum(running) / len(running),
                     "elapsed_s": round(time.time() - started, 1)}
            curve.append(point)
            running = []
            print(json.dumps(point), flush=True)
        if snapshots is not None and (step + 1) % 1000 == 0:  # to look at while it trains
            save(model, snapshots)
    model.eval()
    return curve


# -- held-out evaluation ---------------------------------------------------------------
EVAL_POLICIES = {  # the pipeline's default settings of each policy
    "[MASK]": PromptConfig(policy=Policy.SPAN),
    "[sMASK]": PromptConfig(policy=Policy.SENTENCE),
    "[gMASK]": PromptConfig(policy=Policy.SUFFIX),
}


def held_out(count: int) -> list[tuple[str, str]]:
    """Held-out stories (language, text), from a stream training never drew from."""
    rng = random.Random(EVAL_SEED)
    return [story(rng) for _ in range(count)]


def evaluate(model_dir: Path, count: int, engines: list[str]) -> dict[str, dict]:
    """Exact match per blank of the default policies over held-out stories, by mask kind, for
    each engine; `identical` says whether every engine gave the same answers."""
    from pipeline.engines import make_engine
    from pipeline.glm.requests import SamplingParams

    stories = held_out(count)
    cases = {kind: [POLICIES[cfg.policy]({"text": text}, cfg, "text", f"eval-{i}")
                    for i, (_, text) in enumerate(stories)]
             for kind, cfg in EVAL_POLICIES.items()}
    results: dict[str, dict] = {}
    answers: dict[str, list] = {}
    for engine in engines:
        with make_engine(engine, model_dir) as eng:
            for kind, rows in cases.items():
                fills = eng.fill([prompt for prompt, _ in rows],
                                 params=SamplingParams(max_new_tokens=64))
                answers.setdefault(engine, []).append([[f.token_ids for f in r.fills]
                                                       for r in fills])
                pairs = [(f.text, target) for r, (_, removed) in zip(fills, rows, strict=True)
                         for f, target in zip(r.fills, removed, strict=True)]
                exact = sum(" ".join(a.split()) == " ".join(t.split()) for a, t in pairs)
                results.setdefault(engine, {})[kind] = {
                    "blanks": len(pairs), "exact": exact, "exact_match": exact / len(pairs)}
                print(engine, kind, results[engine][kind], flush=True)
    results["identical"] = all(a == answers[engines[0]] for a in answers.values())
    return results


def plot_loss(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Part B cross-entropy")
    ax.set_title("glm-infill demo GLM: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "pipeline/glm/demo_model")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "docs/demo-model")
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-stories", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--snapshots", type=Path, help="also save the model here every 1000 "
                        "steps, to evaluate while it trains")
    parser.add_argument("--engines", default="torch,vllm", help="engines to evaluate with")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok = write_tokenizer(args.out, random.Random(SEED))
    vocab = math.ceil(len(tok) / 128) * 128  # GLM rounds the vocabulary up to 128
    config = GLMConfig(vocab_size=vocab, **SHAPE)
    model = GLMModel(config)
    model.load_state_dict(random_state_dict(config, SEED))

    snapshots = None
    if args.snapshots is not None:
        snapshots = args.snapshots
        write_tokenizer(snapshots, random.Random(SEED))
    curve = train(model, tok, args.steps, args.batch_size, args.lr, args.log_every, snapshots)
    save(model, args.out)  # the held-out figures below are measured on these float16 weights

    report_dir = args.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_loss(curve, report_dir / "loss.png")
    accuracy = evaluate(args.out, args.eval_stories, args.engines.split(","))
    report = {"steps": args.steps, "batch_size": args.batch_size, "peak_lr": args.lr,
              "shape": SHAPE, "vocab_size": vocab, "seed": SEED,
              "train_seconds": curve[-1]["elapsed_s"], "held_out": accuracy, "loss": curve}
    (report_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

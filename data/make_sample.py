"""Regenerate the sample corpus in data/sample/ (see data/sample/README.md).

    python data/make_sample.py [OUT_DIR]

Deterministic: a fixed seed, sorted output, gzip without a timestamp and one Parquet writer
setting, so a re-run on the same pyarrow version writes the same bytes and the committed
files can be checked against the script.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.glm.demo_world import chinese_story, english_story  # noqa: E402
from pipeline.job.config import PromptConfig  # noqa: E402
from pipeline.job.policies import POLICIES, Policy  # noqa: E402

SEED = 20240601
OUT = Path(__file__).resolve().parent / "sample"
KINDS = ("[MASK]", "[sMASK]", "[gMASK]")
KIND_POLICIES = {"[MASK]": Policy.SPAN, "[sMASK]": Policy.SENTENCE, "[gMASK]": Policy.SUFFIX}

QUESTIONS = (["Where does {person} live?", "How many {item} does {person} have?"],
             ["{person}住在哪里？", "{person}有几个{item}？"])


def _masked(text: str, kind: str, row_key: str) -> tuple[str, list[str]]:
    """The text with blanks of one kind, made by the pipeline's own masking policy."""
    cfg = PromptConfig(policy=KIND_POLICIES[kind], seed=SEED)
    return POLICIES[cfg.policy]({"text": text}, cfg, "text", row_key)


def masked_rows(rng: random.Random, prefix: str, count: int) -> list[dict]:
    """Rows for policy `as_is` with their answers: mask kinds in turn, every fourth Chinese."""
    rows = []
    for i in range(count):
        zh = i % 4 == 3
        sentences = chinese_story(rng) if zh else english_story(rng)
        row_id = f"{prefix}-{i:04d}"
        text, target = _masked(("" if zh else " ").join(sentences), KINDS[i % 3], row_id)
        rows.append({"id": row_id, "text": text, "target": target, "lang": "zh" if zh else "en"})
    return rows


def bad_rows(rng: random.Random) -> list[dict]:
    """Rows every job must turn into error rows, never drop."""
    long_text = " ".join(" ".join(english_story(rng)) for _ in range(40)) + " [gMASK]"
    return [
        {"id": "bad-null", "text": None, "lang": "en"},
        {"id": "bad-empty", "text": "", "lang": "en"},
        {"id": "bad-number", "text": 12345, "lang": "en"},
        {"id": "bad-no-mask", "text": " ".join(english_story(rng)), "lang": "en"},
        {"id": "bad-too-long", "text": long_text, "lang": "en"},
    ]


def plain_rows(rng: random.Random, count: int) -> list[dict]:
    """Rows for the text policies (span, sentence, suffix) and, with a question, template."""
    rows = []
    for i in range(count):
        zh = i % 5 == 4
        sentences = chinese_story(rng) if zh else english_story(rng)
        question = None
        if i % 3 == 0:  # the person from the first sentence, the item from the second
            if zh:
                person, item = sentences[0].split("住在")[0], sentences[1].split("个")[-1][:-1]
            else:
                person, item = sentences[0].split(" lives in ")[0], sentences[1].split()[-1][:-1]
            question = QUESTIONS[zh][i % 2].format(person=person, item=item)
        rows.append({"id": f"plain-{i:04d}", "text": ("" if zh else " ").join(sentences),
                     "question": question, "lang": "zh" if zh else "en"})
    rows += [{"id": "plain-bad-null", "text": None, "question": None, "lang": "en"},
             {"id": "plain-bad-empty", "text": "", "question": "Is this empty?", "lang": "en"}]
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def broken_lines() -> bytes:
    """A JSONL file with a malformed line, a non-UTF-8 line and a non-object line."""
    good = [{"id": "lines-ok-1", "text": "Ladu lives in Kiso. So Ladu from [MASK] had 3 pens.",
             "target": ["Kiso"], "lang": "en"},
            {"id": "lines-ok-2", "text": "3 plus 4 is [MASK] so Bo now has 7 cups.",
             "target": ["7,"], "lang": "en"}]
    return b"".join([
        jsonl(good[:1]),
        b'{"id": "lines-malformed", "text": "an unterminated string\n',
        b'{"id": "lines-latin1", "text": "caf\xe9 au lait is [MASK].", "lang": "fr"}\n',
        b"[1, 2, 3]\n",
        jsonl(good[1:]),
    ])


def write(out: Path) -> None:
    rng = random.Random(SEED)
    (out / "masked").mkdir(parents=True, exist_ok=True)
    (out / "plain").mkdir(parents=True, exist_ok=True)
    en_rows = masked_rows(rng, "masked", 110)
    (out / "masked" / "part-000.jsonl").write_bytes(jsonl(en_rows[:55] + bad_rows(rng)
                                                          + en_rows[55:]))
    with (out / "masked" / "part-001.jsonl.gz").open("wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(jsonl(masked_rows(rng, "masked-gz", 50)))
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("question", pa.string()),
                        ("lang", pa.string())])
    table = pa.Table.from_pylist(plain_rows(rng, 120), schema=schema)
    pq.write_table(table, out / "plain" / "part-000.parquet", compression="zstd",
                   row_group_size=64)
    (out / "bad_rows.jsonl").write_bytes(broken_lines())


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)

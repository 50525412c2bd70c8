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

SEED = 20240601
OUT = Path(__file__).resolve().parent / "sample"

SUBJECTS = ["the old farmer", "a young engineer", "my neighbour", "the small cat", "our teacher",
            "the tired runner", "a curious child", "the city council", "the ship captain",
            "a quiet student", "the baker", "two musicians"]
VERBS = ["repaired", "painted", "found", "carried", "described", "visited", "cleaned",
         "measured", "photographed", "borrowed", "ordered", "planted"]
OBJECTS = ["the wooden bridge", "a red bicycle", "the broken clock", "an old map",
           "the garden wall", "a heavy box", "the village library", "a silver kettle",
           "the long report", "a bag of apples", "the stone tower", "a paper kite"]
PLACES = ["near the river", "before sunrise", "in the market square", "after the storm",
          "on a cold morning", "behind the station", "during the festival", "at the harbour",
          "in the quiet valley", "under the bright lamps"]
ENDINGS = ["Everyone was surprised.", "It took the whole afternoon.", "Nobody had expected it.",
           "The work was finally done.", "Later they told the story again.",
           "It was raining the entire time.", "The neighbours came to watch.",
           "Then everybody went home."]
QUESTIONS = ["What is the capital of France?", "Who wrote the first dictionary?",
             "How many legs does a spider have?", "Why is the sky blue?",
             "What do bees make?", "Where does the river end?", "When does the train leave?",
             "Which planet is the largest?"]
ZH_SENTENCES = ["今天天气很好。", "我们去公园散步吧！", "老师在教室里讲故事。",
                "小猫在窗台上睡觉。", "城市的晚上非常安静。", "他每天早上六点起床。",
                "这本书很有意思。", "我们一起去吃饭吧。", "河边有很多人在钓鱼。", "明天会下雨吗？"]


def sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
    return words[0].upper() + words[1:] + "."


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join([sentence(rng) for _ in range(sentences - 1)] + [rng.choice(ENDINGS)])


def with_mask(rng: random.Random, kind: str) -> str:
    """A short English text holding one or two blanks of the given kind."""
    if kind == "[gMASK]":
        return paragraph(rng, rng.randint(1, 3)) + " [gMASK]"
    if kind == "[sMASK]":
        parts = [sentence(rng), "[sMASK]", rng.choice(ENDINGS)]
        return " ".join(parts)
    words = paragraph(rng, rng.randint(2, 3)).split()
    half = len(words) // 2
    # one blank, or two: one in each half of the text
    spans = [(0, len(words))] if rng.random() < 0.5 else [(0, half), (half + 1, len(words))]
    for start, end in spans:
        position = rng.randrange(start, end)
        words[position] = "[MASK]" + ("." if words[position].endswith(".") else "")
    return " ".join(words)


def zh_text(rng: random.Random, mask: str | None) -> str:
    chosen = rng.sample(ZH_SENTENCES, 3)
    if mask == "[gMASK]":
        return "".join(chosen) + mask
    if mask is not None:
        i = rng.randrange(3)
        chosen[i] = mask if mask == "[sMASK]" else chosen[i][:2] + mask + chosen[i][4:]
    return "".join(chosen)


def masked_rows(rng: random.Random, prefix: str, count: int) -> list[dict]:
    """Rows for policy `as_is`: every third one Chinese, mask kinds in turn."""
    rows = []
    for i in range(count):
        kind = ("[MASK]", "[sMASK]", "[gMASK]")[i % 3]
        zh = i % 4 == 3
        text = zh_text(rng, kind) if zh else with_mask(rng, kind)
        rows.append({"id": f"{prefix}-{i:04d}", "text": text, "lang": "zh" if zh else "en"})
    return rows


def bad_rows(rng: random.Random) -> list[dict]:
    """Rows every job must turn into error rows, never drop."""
    long_text = " ".join(sentence(rng) for _ in range(200)) + " [gMASK]"
    return [
        {"id": "bad-null", "text": None, "lang": "en"},
        {"id": "bad-empty", "text": "", "lang": "en"},
        {"id": "bad-number", "text": 12345, "lang": "en"},
        {"id": "bad-no-mask", "text": "This sentence has no blank at all.", "lang": "en"},
        {"id": "bad-too-long", "text": long_text, "lang": "en"},
    ]


def plain_rows(rng: random.Random, count: int) -> list[dict]:
    """Rows for the text policies (span, sentence, suffix) and, with a question, template."""
    rows = []
    for i in range(count):
        zh = i % 5 == 4
        text = zh_text(rng, None) if zh else paragraph(rng, rng.randint(2, 4))
        question = QUESTIONS[i % len(QUESTIONS)] if i % 3 == 0 else None
        rows.append({"id": f"plain-{i:04d}", "text": text, "question": question,
                     "lang": "zh" if zh else "en"})
    rows += [{"id": "plain-bad-null", "text": None, "question": None, "lang": "en"},
             {"id": "plain-bad-empty", "text": "", "question": "Is this empty?", "lang": "en"}]
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def broken_lines() -> bytes:
    """A JSONL file with a malformed line, a non-UTF-8 line and a non-object line."""
    good = [{"id": "lines-ok-1", "text": "The river was [MASK] after the storm.", "lang": "en"},
            {"id": "lines-ok-2", "text": "She opened the door and [MASK].", "lang": "en"}]
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

"""Pipeline overhead on the CPU: the whole Ray job vs the same engine alone on the same rows.

Both runs use the demo checkpoint and the torch engine with the job's batch size; the job's
figure includes reading, prompt building, the actor pool and the Parquet commits. Then peak
memory (driver + every Ray process, sampled) of the job at two corpus sizes, to show it does
not grow with the corpus.

    python -m benchmarks.bench_pipeline [--rows 1000] [--memory-rows 10000 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipeline import InfillJob
from pipeline.demo import ensure_demo_checkpoint
from pipeline.infill import SamplingParams, run_procedures
from pipeline.torch_engine import TorchEngine

WORDS = ["the", "river", "city", "table", "file", "data", "mode", "value", "year", "model",
         "answer", "question"]
SHARDS = 8


def write_corpus(root: Path, rows: int, seed: int = 0) -> Path:
    """`rows` JSONL rows of 20-40 words with one [MASK], split over SHARDS files."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    files = [(root / f"part-{i:03d}.jsonl").open("w") for i in range(SHARDS)]
    for i in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 40))]
        words.insert(rng.randint(1, len(words) - 1), "[MASK]")
        files[i % SHARDS].write(json.dumps({"id": f"row-{i}", "text": " ".join(words)}) + "\n")
    for handle in files:
        handle.close()
    return root


def job_for(corpus: Path, output: Path, max_new_tokens: int, batch_size: int) -> InfillJob:
    return InfillJob.from_kwargs(
        source={"paths": str(corpus), "id_column": "id"},
        output={"path": str(output)},
        model={"engine": "torch"},
        sampling={"max_new_tokens": max_new_tokens},
        resources={"concurrency": 1, "batch_size": batch_size},
        ray={"num_cpus": 4},
    )


class PeakMemory:
    """Samples the summed RSS of this process and all Ray processes every 0.2 s."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = me.memory_info().rss
            for process in psutil.process_iter(["name", "cmdline"]):
                line = " ".join(process.info["cmdline"] or [])
                if process.pid != me.pid and ("ray" in line or "raylet" in line):
                    with contextlib.suppress(psutil.Error):
                        total += process.memory_info().rss
            self.peak = max(self.peak, total)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-rows", type=int, nargs="*", default=[10_000, 100_000])
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus", args.rows)
        texts = [json.loads(line)["text"] for path in sorted(corpus.glob("*.jsonl"))
                 for line in path.read_text().splitlines()]
        engine = TorchEngine(ensure_demo_checkpoint(), max_batch_size=args.batch_size)
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        start = time.perf_counter()
        results = run_procedures(engine, texts, "iterative", params)
        alone = time.perf_counter() - start
        tokens = sum(len(r.prompt_token_ids) + sum(len(f.token_ids) for f in r.fills)
                     for r in results)
        del engine

        ray.init(num_cpus=4, include_dashboard=False)
        start = time.perf_counter()
        manifest = job_for(corpus, root / "out", args.max_new_tokens, args.batch_size).run()
        piped = time.perf_counter() - start
        assert manifest["rows_ok"] == len(texts), manifest["rows_error"]

        print(f"{len(texts)} rows in {SHARDS} shards, torch engine, demo checkpoint, greedy, "
              f"up to {args.max_new_tokens} new tokens, batch {args.batch_size}")
        print(f"{'run':<14} {'seconds':>8} {'rows/s':>8} {'tokens/s':>9} {'vs engine':>9}")
        for name, seconds in (("engine alone", alone), ("ray job", piped)):
            print(f"{name:<14} {seconds:>8.2f} {len(texts) / seconds:>8.1f} "
                  f"{tokens / seconds:>9.1f} {alone / seconds:>8.2f}x")
        print(f"pipeline overhead: the job takes {piped / alone:.2f}x the engine's time")

        for rows in args.memory_rows:
            corpus = write_corpus(root / f"corpus-{rows}", rows)
            with PeakMemory() as memory:
                start = time.perf_counter()
                manifest = job_for(corpus, root / f"out-{rows}", 1, args.batch_size).run()
            print(f"{rows:>7} rows (1 new token each): peak RSS {memory.peak / 2**30:.2f} GiB, "
                  f"{time.perf_counter() - start:.0f} s, {manifest['rows_ok']} ok, "
                  f"{manifest['rows_error']} errors")


if __name__ == "__main__":
    main()

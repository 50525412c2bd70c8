"""The data plane at scale: memory, spreading one file over actors, and pipeline overhead.

Three measurements, each printed with its baseline from the same process:

* `memory`: peak RSS of the driver plus every Ray process while the job runs one Parquet file
  of N rows and one JSONL file of N rows (1 new token per row, a 1-layer model): memory must
  not grow with the file (the largest run within 1.1x of the smallest).
* `spread`: one file, concurrency 1 vs 2: rows/s of each and how many generate actors worked.
* `overhead`: the whole job vs the engine alone on the same rows, random weights in the
  glm-small shape (pipeline/glm/workload.py), greedy, 32 new tokens; also with the demo
  model. The job's time includes reading, prompts, the actor start, the model's load and the
  part commits; the engine's is printed without and with its load. Once with the engine on
  every core, once on every core but one.

    python -m benchmarks.bench_data_plane memory --rows 100000 1000000
    python -m benchmarks.bench_data_plane spread --rows 200000
    python -m benchmarks.bench_data_plane overhead --rows 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import InfillJob
from pipeline.engines.base import TorchOptions
from pipeline.engines.torch_engine import TorchEngine
from pipeline.glm.demo import demo_checkpoint, write_random_demo_checkpoint
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.glm.workload import Shape, write_shape_checkpoint

WORDS = ["the", "river", "city", "table", "file", "data", "mode", "value", "year", "model",
         "answer", "question", "north", "market", "seven", "garden"]


class PeakMemory:
    """Samples the memory of this process and every process it started (the local Ray
    cluster: GCS, raylet, workers; nothing of other clusters on the machine) every 0.5 s.
    `peak` sums PSS (each shared page split among the processes mapping it: torch's libraries
    and the object store are not counted once per process); `peak_rss` sums RSS, which counts
    them again in every process. `parts` splits the peak PSS (Linux's smaps_rollup): `anon`
    (heaps: Python, Arrow, torch), `file` (mapped libraries and files) and `shmem` (shared
    memory: Ray's object store); `by_process` the peak's PSS and number of processes per process
    title (the driver, `raylet`, `ray::IDLE`, a stage's actor), summed over one title;
    `peak_at` when the peak was, in seconds from the start."""

    def __enter__(self) -> PeakMemory:
        self.peak, self.peak_rss, self._stop = 0, 0, threading.Event()
        self.parts: dict[str, int] = {}
        self.by_process: dict[str, tuple[int, int]] = {}
        self.peak_at, self._start = 0.0, time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.5):
            total = {"pss": 0, "rss": 0, "anon": 0, "file": 0, "shmem": 0}
            by_process: dict[str, tuple[int, int]] = {}
            processes = [me]
            with contextlib.suppress(psutil.Error):
                processes += me.children(recursive=True)
            for process in processes:
                with contextlib.suppress(OSError, psutil.Error):
                    fields = smaps_rollup(process.pid)
                    title = "driver" if process is me else process_title(process)
                    pss, count = by_process.get(title, (0, 0))
                    by_process[title] = (pss + fields["pss"] * 1024, count + 1)
                    for name, kib in fields.items():
                        total[name] += kib * 1024
            if total["pss"] > self.peak:
                self.peak, self.parts, self.by_process = total["pss"], total, by_process
                self.peak_at = time.perf_counter() - self._start
            self.peak_rss = max(self.peak_rss, total["rss"])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


ROLLUP_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file",
                 "Pss_Shmem:": "shmem"}


def smaps_rollup(pid: int) -> dict[str, int]:
    """A process's memory in KiB: RSS, PSS and PSS by kind (/proc/PID/smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name in ROLLUP_FIELDS:
            fields[ROLLUP_FIELDS[name]] = int(rest.split()[0])
    return fields


def process_title(process: psutil.Process) -> str:
    """What a process is: Ray's title of a worker (`ray::IDLE`, `ray::MapWorker(...)`), else
    its program's name (`raylet`, `gcs_server`)."""
    words = process.cmdline()
    first = words[0] if words else process.name()
    return first.split(" ")[0] if first.startswith("ray::") else Path(first).name


def texts(rows: int, seed: int = 0, words: tuple[int, int] = (20, 40)) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        line = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        line.insert(rng.randint(1, len(line) - 1), "[MASK]")
        out.append(" ".join(line))
    return out


def write_parquet(path: Path, rows: int) -> Path:
    writer = None
    for start in range(0, rows, 50_000):
        count = min(50_000, rows - start)
        table = pa.table({"id": [f"r{i}" for i in range(start, start + count)],
                          "text": texts(count, seed=start)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=5_000)
    writer.close()
    return path


def write_jsonl(path: Path, rows: int) -> Path:
    with path.open("w") as handle:
        for start in range(0, rows, 50_000):
            for i, text in enumerate(texts(min(50_000, rows - start), seed=start)):
                handle.write(json.dumps({"id": f"r{start + i}", "text": text}) + "\n")
    return path


def written_apart(write: Callable[[Path, int], Path], path: Path, rows: int) -> Path:
    """`write(path, rows)` in a process of its own: making a 1M-row file leaves this process's
    heaps larger (freed Python and Arrow memory kept for reuse), which the measured driver
    would otherwise carry into the job."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(write, path, rows).result()


def run_job(source: Path, output: Path, model: Path, max_new_tokens: int,
            concurrency: int = 1, batch_size: int = 32, cpus_per_actor: float = 0.5
            ) -> tuple[dict, float]:
    """One job; Ray gives an actor of N CPUs N threads (OMP_NUM_THREADS), so the engine's
    share of the machine is `cpus_per_actor`."""
    job = InfillJob.from_kwargs(
        source={"paths": str(source), "id_column": "id"}, output={"path": str(output)},
        model={"path": str(model), "engine": "torch",
               "engine_options": {"max_batch_size": batch_size}},
        sampling={"max_new_tokens": max_new_tokens},
        resources={"concurrency": concurrency, "batch_size": batch_size,
                   "num_cpus_per_actor": cpus_per_actor})
    start = time.perf_counter()
    manifest = job.run().manifest
    return manifest, time.perf_counter() - start


def memory(args: argparse.Namespace, root: Path) -> None:
    model = tiny_model(root)
    print("peak RSS of the driver and every Ray process, 1 new token per row, 1-layer model")
    baseline: dict[str, int] = {}
    for rows in args.rows:
        for kind, write in (("parquet", write_parquet), ("jsonl", write_jsonl)):
            if kind not in args.kinds:
                continue
            source = written_apart(write, root / f"{kind}-{rows}.{kind}", rows)
            with PeakMemory() as peak:
                manifest, seconds = run_job(source, root / f"out-{kind}-{rows}", model, 1)
            first = baseline.setdefault(kind, peak.peak)
            print(f"{kind:<8} {rows:>9} rows: peak PSS {peak.peak / 2**30:5.2f} GiB "
                  f"({peak.peak / first:.2f}x its smallest run; RSS sum "
                  f"{peak.peak_rss / 2**30:.2f} GiB; of the PSS: heaps "
                  f"{peak.parts['anon'] / 2**30:.2f}, files {peak.parts['file'] / 2**30:.2f}, "
                  f"object store {peak.parts['shmem'] / 2**30:.2f} GiB), {seconds:6.0f} s, "
                  f"{rows / seconds:7.0f} rows/s, {manifest['rows_ok']} ok, "
                  f"{manifest['parts_total']} parts")
            largest = sorted(peak.by_process.items(), key=lambda item: -item[1][0])[:6]
            print(f"    at the peak ({peak.peak_at:.0f} s): " + ", ".join(
                f"{title} {pss / 2**20:.0f} MiB" + (f" ({count})" if count > 1 else "")
                for title, (pss, count) in largest))


def tiny_model(root: Path) -> Path:
    """1 layer, hidden 128: the data plane's own costs show, not the model's."""
    return write_random_demo_checkpoint(root / "tiny", num_layers=1, hidden_size=128,
                                        num_attention_heads=2, max_sequence_length=128)


def spread(args: argparse.Namespace, root: Path) -> None:
    model = tiny_model(root)
    source = write_parquet(root / "one.parquet", args.rows[0])
    print(f"one Parquet file of {args.rows[0]} rows, 1-layer model, 1 new token")
    first = None
    for concurrency in (1, 2):
        manifest, seconds = run_job(source, root / f"out-{concurrency}", model, 1, concurrency)
        workers = {w for part in manifest["parts"].values() for w in part["generated_by"]}
        rate = args.rows[0] / seconds
        first = first or rate
        print(f"concurrency {concurrency}: {seconds:6.1f} s, {rate:7.0f} rows/s "
              f"({rate / first:.2f}x concurrency 1), {len(workers)} actor(s) generated, "
              f"{manifest['parts_total']} parts")


def overhead(args: argparse.Namespace, root: Path) -> None:
    import torch

    models = {"glm-small (random)": write_shape_checkpoint(root / "glm-small", Shape.GLM_SMALL),
              "demo": demo_checkpoint()}
    rows = args.rows[0]
    source = write_jsonl(root / "rows.jsonl", rows)
    corpus = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    print(f"{rows} rows, torch engine, greedy, up to {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {len(os.sched_getaffinity(0))} cores")
    for threads in args.engine_threads or engine_thread_counts():
        # the engine alone and the job's one engine get the same threads (Ray gives an actor
        # of N CPUs N threads); with fewer threads than cores the rest run Ray's machinery
        torch.set_num_threads(threads)
        print(f"engine on {threads} thread(s):")
        for name, model in models.items():
            start = time.perf_counter()
            with TorchEngine(model, options=TorchOptions(max_batch_size=args.batch_size)
                             ) as engine:
                loaded = time.perf_counter()
                results = engine.fill(corpus, MultiMask.ITERATIVE, params)
                alone = time.perf_counter() - loaded
            with_load = time.perf_counter() - start
            tokens = sum(len(f.token_ids) for r in results for f in r.fills)
            manifest, piped = run_job(source, root / f"out-{name[:4]}-{threads}", model,
                                      args.max_new_tokens, batch_size=args.batch_size,
                                      cpus_per_actor=float(threads))
            assert manifest["output_tokens"] == tokens, (manifest["output_tokens"], tokens)
            print(f"  {name:<20} engine alone {tokens / alone:7.1f} out tok/s "
                  f"({alone:6.1f} s; {with_load:6.1f} s with its load); job "
                  f"{tokens / piped:7.1f} out tok/s ({piped:6.1f} s) = {alone / piped:.2f}x "
                  f"the engine ({with_load / piped:.2f}x with the engine's load)")


def engine_thread_counts() -> list[int]:
    """Every core, as a CPU-only node would run it; and every core but one, as a GPU node
    leaves its CPUs to Ray's machinery (Ray Data's executor loop in the driver, its actors,
    GCS, raylet): on a CPU every engine thread that waits for one preempted thread at a
    barrier loses that time too, so a few percent of one core taken by the machinery costs an
    engine on every core several percent."""
    cores = len(os.sched_getaffinity(0))
    return [cores, cores - 1] if cores > 1 else [cores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["memory", "spread", "overhead"])
    parser.add_argument("--rows", type=int, nargs="+", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["parquet", "jsonl"],
                        help="memory: the file formats to measure")
    parser.add_argument("--engine-threads", type=int, nargs="+", default=None,
                        help="overhead: the engine's threads (default: every core, and every "
                             "core but one)")
    args = parser.parse_args()
    args.rows = args.rows or {"memory": [100_000, 1_000_000], "spread": [200_000],
                              "overhead": [1000]}[args.what]
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        {"memory": memory, "spread": spread, "overhead": overhead}[args.what](args, Path(tmp))


if __name__ == "__main__":
    main()

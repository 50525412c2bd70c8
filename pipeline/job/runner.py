"""The job runner: `InfillJob` (the SDK) plans, resumes and runs a job on Ray Data.

A run lists the input files, cuts them into work units (plan.py), leaves out the units an
earlier run of the same config committed (resume), and streams the rest through read ->
prompts -> generate -> write on Ray Data. Parts are written on the workers; the driver only
receives one small commit record per unit and keeps the manifest. A crash costs at most the
units in flight.

How a run ends (and the exit code `glm-infill run` gives it):
* `succeeded` (0);
* `failed` because of the data (1, `JobFailed`): the error rate is above
  `output.max_error_rate`, or a file could not be parsed or is damaged and
  `source.skip_unreadable_files` is off. Everything readable is committed first;
* `failed` because the engines refused the settings at start (2, `EngineSettingsError`: a
  device the machine lacks, a KV cache larger than memory);
* `failed` because of the machinery (3, `InfrastructureError`): storage, network, a dead engine
  that Ray could not bring back, after the retries. Units in flight are not committed and the
  next run redoes them;
* `failed` because it was interrupted (130, `JobInterrupted`: Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engines.base import EngineConfigError
from pipeline.job.checks import check_columns, check_model
from pipeline.job.cluster import cluster_address, connect, ray_job_working_dir
from pipeline.job.config import ConfigError, JobConfig, load_config, resolve_paths, validate
from pipeline.job.manifest import Progress, RowEstimate, RunManifest
from pipeline.job.plan import Plan, Unit, is_inside, list_files, plan_units
from pipeline.job.result import JobResult
from pipeline.job.retry import root_cause
from pipeline.job.scoring import QUALITY_COLUMNS
from pipeline.job.storage import OutputError, OutputStore, SourceFormat
from pipeline.job.write import unit_stats
from schemas.output import (
    META_CONFIG_HASH,
    META_DAMAGE,
    META_LAST_UNIT,
    META_SCHEMA_VERSION,
    META_SOURCE_FILE,
    META_UNIT,
    SCHEMA_VERSION,
)

if TYPE_CHECKING:
    import ray.data

PREFIX = "[glm-infill]"
READ_CPUS = 0.5  # fractional, so that reads never starve the actors on small machines
PROMPT_CPUS = 0.25
WRITE_CPUS = 0.25
PROGRESS_LOGGER = "ray.data._internal.progress"  # "Progress bars disabled" on every run
MAX_UNIT_BLOCK = 1 << 30  # above any unit: Ray Data must not split a unit's block


class JobFailed(RuntimeError):
    """The job ran and committed what it could, but the data did not pass (exit 1)."""

    exit_code = 1
    result: JobResult | None = None  # the failed run's result, manifest included


class InfrastructureError(RuntimeError):
    """A fault of the machinery that the retries did not overcome (exit 3)."""

    exit_code = 3
    result: JobResult | None = None


class EngineSettingsError(ConfigError):
    """The engines could not start with these settings (exit 2, like any config mistake, but
    found on the cluster: the manifest says failed)."""

    exit_code = 2
    result: JobResult | None = None


class JobInterrupted(BaseException):
    """Ctrl-C or SIGTERM (exit 130)."""

    exit_code = 130
    result: JobResult | None = None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (ray job stop, Airflow, a scheduler) ends the run like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise JobInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def _check_schema_version(where: str, metadata: dict[bytes, bytes]) -> None:
    """A part of another output schema cannot be resumed: its columns (and the scores the
    manifest totals) are not this version's."""
    found = metadata.get(META_SCHEMA_VERSION, b"").decode()
    if found != SCHEMA_VERSION:
        raise OutputError(f"{where} has output schema version {found or 'unknown'}, this "
                          f"version writes {SCHEMA_VERSION}; set output.overwrite: true "
                          "(--overwrite) or choose another output.path")


class InfillJob:
    """One infill job: a validated config and the means to run it on Ray."""

    def __init__(self, config: JobConfig, log: Callable[[str], None] = _log):
        self.config = config
        self.log = log

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> InfillJob:
        """A job from a YAML file (local or object storage) and `key.sub=value` overrides;
        relative paths in the file are relative to the file, in overrides to the working
        directory."""
        return cls(load_config(path, list(overrides)))

    @classmethod
    def from_kwargs(cls, **sections: Any) -> InfillJob:
        """A job from config sections given as dicts or section models (relative paths are
        relative to the working directory)."""
        raw = {name: value.model_dump() if hasattr(value, "model_dump") else value
               for name, value in sections.items()}
        return cls(validate(resolve_paths(raw, os.getcwd())))

    def _check_paths(self) -> None:
        """An output inside an input folder would be read back as input by the next run; one
        inside a Ray job's working_dir copy would be deleted with the job."""
        output = self.config.output.path
        copy = ray_job_working_dir()
        if copy and is_inside(output, copy):
            raise ConfigError(
                f"output.path {output} lies inside this Ray job's copy of its working_dir, "
                "which Ray deletes later; give an absolute path outside it or an "
                "object-storage URI (--set output.path=s3://...), or submit with "
                "`glm-infill submit`, which resolves relative paths on your machine")
        for path in self.config.source.paths:
            folder = path[:min([path.find(c) for c in "*?[" if c in path] or [len(path)])]
            if is_inside(output, folder.rstrip("/") or "/"):
                raise ConfigError(f"output.path {output} lies inside source path {path}: the "
                                  "next run would read the results as input; choose an output "
                                  "outside every source path")

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
            _check_schema_version(f"{store.uri}/{name}", meta.metadata or {})
        store.clear_tmp()
        return committed

    def _check_model(self) -> None:
        """Fail before any engine starts when the checkpoint is unusable or the token budget
        would fail every row; a path only the cluster's nodes have is looked at there."""
        check_model(self.config, self.log)

    def dataset(self) -> ray.data.Dataset:
        """The job's results as a lazy Ray Dataset, one row per input row in the output
        schema (`schemas/output.py`), to compose with other Ray Data steps as Ray Data LLM's
        processors do: nothing is executed until it is consumed, and nothing is written,
        resumed or recorded in a manifest (`run()` is the batch job that does all that).
        A file that cannot be parsed, or a compressed one that ends in damage, fails it unless
        `source.skip_unreadable_files` (then its readable rows are the dataset's)."""
        config = self.config
        files = self._preflight()
        connect(config)
        plan = plan_units(files, config.source, set(), set())
        if plan.unreadable and not config.source.skip_unreadable_files:
            uri, why = next(iter(plan.unreadable.items()))
            raise JobFailed(f"{len(plan.unreadable)} input file(s) cannot be read (e.g. "
                            f"{uri}: {why})")
        return build_dataset(config, plan.units, config.config_hash(), commit=False)

    def _preflight(self) -> list[str]:
        """What must hold before anything starts (ConfigError otherwise); the input files."""
        config = self.config
        cluster_address(config)
        self._check_model()
        files = list_files(config.source)
        check_columns(config, files)
        return files

    def run(self) -> JobResult:
        """Run (or resume) the job on the current Ray cluster. A failure raises `JobFailed`,
        `InfrastructureError` or `JobInterrupted` with the failed run's `result` attached, a
        config mistake `ConfigError` (before anything is written)."""
        config = self.config
        self._check_paths()
        files = self._preflight()
        config_hash = config.config_hash()
        store = OutputStore(config.output.path, config.source.storage)
        committed = self._check_output(store, config_hash)
        if config.model.path is None:
            from pipeline.glm.demo import demo_notice

            self.log(f"{demo_notice()} (model.path)")
        run = RunManifest(config, store, files, self.log)
        with self._report_at_end(store, run):
            return self._run_recorded(run, store, files, committed)

    def _run_recorded(self, run: RunManifest, store: OutputStore, files: list[str],
                      committed: dict[str, Any]) -> JobResult:
        """`_run`, with the manifest saved as failed on every failure path."""
        try:
            with _sigterm_interrupts():
                return JobResult.from_manifest(self._run(run, store, files, committed), 0)
        except (JobFailed, ConfigError):
            raise
        except (JobInterrupted, KeyboardInterrupt) as err:
            interrupted = err if isinstance(err, JobInterrupted) else JobInterrupted(
                "Ctrl-C")
            manifest = run.save("failed", f"interrupted: {interrupted}")
            interrupted.result = JobResult.from_manifest(manifest, interrupted.exit_code)
            if interrupted is err:
                raise
            raise interrupted from None
        except Exception as err:
            reason = root_cause(err)
            manifest = run.manifest("failed", reason)
            try:
                run.save("failed", reason)
            except Exception as save_err:  # the output store itself may be what failed
                self.log(f"could not write the manifest: {save_err}")
            settings = f"{EngineConfigError.__name__}:" in reason  # from the actor's traceback
            failure = (EngineSettingsError if settings else InfrastructureError)(reason)
            failure.result = JobResult.from_manifest(manifest, failure.exit_code)
            raise failure from err

    @contextlib.contextmanager
    def _report_at_end(self, store: OutputStore, run: RunManifest) -> Iterator[None]:
        """The run report beside the manifest once a run that has parts ends, succeeded or
        failed (not interrupted: a stop must be quick). A report that cannot be made is one
        warning, never the job's failure."""
        interrupted = False
        try:
            yield
        except JobInterrupted:
            interrupted = True
            raise
        finally:
            if run.parts and not interrupted:
                try:
                    from pipeline.report import write_report

                    write_report(store)
                except Exception as err:
                    self.log(f"warning: the run report could not be written: {err}")

    def _run(self, run: RunManifest, store: OutputStore, files: list[str],
             committed: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        finished_streams = self._resume(run, store, committed)
        connect(config)
        plan = plan_units(files, config.source, set(committed), finished_streams)
        run.unreadable = plan.unreadable
        self.log(f"job {run.hash[:12]}: {len(files)} files, {len(committed)} parts already "
                 f"committed, {len(plan.units)} read tasks to do -> {store.uri}")
        run.save("running")
        if plan.units:
            self._generate(run, plan)
        self._check_complete(run, store, plan)
        manifest = run.save("succeeded")
        store.clear_tmp()
        problems = self._data_problems(manifest)
        if problems:
            failure = JobFailed(f"{problems}; outputs and manifest are in {store.uri}")
            failure.result = JobResult.from_manifest(run.save("failed", problems), 1)
            raise failure
        return manifest

    def _data_problems(self, manifest: dict[str, Any]) -> str | None:
        config = self.config
        if manifest["error_rate"] > config.output.max_error_rate:
            return (f"{manifest['rows_error']} of {manifest['rows_in']} rows failed (error rate "
                    f"{manifest['error_rate']:.3f} > output.max_error_rate "
                    f"{config.output.max_error_rate})")
        bad = {**manifest["unreadable_files"], **manifest["damaged_files"]}
        if bad and not config.source.skip_unreadable_files:
            first = next(iter(bad))
            return (f"{len(bad)} input file(s) could not be read whole (e.g. {first}: "
                    f"{bad[first]}); set source.skip_unreadable_files: true to accept that")
        return None

    def _resume(self, run: RunManifest, store: OutputStore, committed: dict[str, Any]
                ) -> set[str]:
        """Record the parts an earlier run committed; return the compressed files whose every
        unit is committed (their last unit included)."""
        units_by_file: dict[str, set[int]] = {}
        last_unit: dict[str, int] = {}
        for name, meta in committed.items():
            info = meta.metadata or {}
            source = info.get(META_SOURCE_FILE, b"").decode()
            unit = int(info.get(META_UNIT, b"0"))
            stats = unit_stats(store.read_part(name, ["error_type", "prompt_tokens",
                                                      "output_tokens", *QUALITY_COLUMNS]))
            last = info.get(META_LAST_UNIT) == b"true"
            run.add_part({"part": name, "source_file": source, "unit": unit, "last": last,
                          "damage": info.get(META_DAMAGE, b"").decode() or None, **stats},
                         "skipped")
            units_by_file.setdefault(source, set()).add(unit)
            if last:
                last_unit[source] = unit
        return {source for source, last in last_unit.items()
                if units_by_file[source] >= set(range(last + 1))}

    def _generate(self, run: RunManifest, plan: Plan) -> None:
        """Stream the units through Ray Data; the driver sees only the commit records."""
        estimate = RowEstimate(plan.rows_known, plan.bytes_unknown, {
            u.part: u.stop - u.start for u in plan.units
            if u.fmt is SourceFormat.JSONL and u.index is not None and u.stop is not None})
        with Progress(run, estimate, self.config.output.progress_interval_s, self.log):
            for record in build_dataset(self.config, plan.units, run.hash).iter_rows():
                record = {**record, "error_types": json.loads(record["error_types"]),
                          "quality": json.loads(record["quality"])}
                estimate.add(record["part"], record["rows"])
                run.add_part(record, "committed")

    def _check_complete(self, run: RunManifest, store: OutputStore, plan: Plan) -> None:
        """Every planned unit must now have its part; otherwise the run failed, whatever Ray
        said. One listing: the commit records already describe every part but those of empty
        units, which their read task commits without a record (only their footers are read)."""
        present = store.part_names()
        for name in sorted(present - set(run.parts)):
            info = store.part_metadata(name).metadata or {}
            run.add_part({"part": name, "source_file": info[META_SOURCE_FILE].decode(),
                          "unit": int(info[META_UNIT]),
                          "last": info.get(META_LAST_UNIT) == b"true", "rows": 0, "ok": 0,
                          "error": 0, "prompt_tokens": 0, "output_tokens": 0,
                          "error_types": {},
                          "damage": info.get(META_DAMAGE, b"").decode() or None}, "committed")
        missing = [u.part for u in plan.units if u.index is not None and u.part not in present]
        ended = {p["source_file"] for p in run.parts.values() if p["last"]}
        unended = [u.uri for u in plan.units if u.index is None and u.uri not in ended]
        if missing or unended:
            what = missing[:1] or [f"the end of {unended[0]}"]
            raise InfrastructureError(f"{len(missing) + len(unended)} unit(s) were not "
                                      f"committed (e.g. {what[0]}); run the job again to "
                                      "finish them")


def build_dataset(config: JobConfig, units: list[Unit], config_hash: str, commit: bool = True
                  ) -> ray.data.Dataset:
    """read -> prompts -> generate -> write over the units: one unit is one block end to end
    (one read task each, `batch_size=None` on every stage), so every call sees whole units.
    The batch job commits (parts written on the workers, the dataset's rows are the commit
    records); without `commit` the last stage only turns the rows into the output schema."""
    import ray.data

    from pipeline.job.backpressure import UNITS_IN_FLIGHT, bound_read_ahead, object_store_budget
    from pipeline.job.generate import GenerateStage
    from pipeline.job.prompts import PromptStage
    from pipeline.job.read import UnitDatasource
    from pipeline.job.write import output_rows, write_units

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own progress line (manifest.Progress) ...
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.ERROR)  # ... and no note about it
    context.target_max_block_size = max(context.target_max_block_size or 0, MAX_UNIT_BLOCK)
    job = config.model_dump(mode="json")
    stage_args = {"config": job}
    res = config.resources
    low, high = res.actor_range
    # As many reads and writes at once as generate actors (or units, if fewer): a unit is read
    # or written in a fraction of the time it takes to fill, and each task that runs at once
    # is a worker process Ray starts and keeps (uncapped, fractional CPUs let a 1M-row file
    # start a dozen)
    tasks = ray.data.TaskPoolStrategy(size=max(1, min(high, len(units))))
    ds = ray.data.read_datasource(UnitDatasource(units, job, config_hash, commit),
                                  override_num_blocks=len(units), num_cpus=READ_CPUS,
                                  compute=tasks)
    # the dataset's own copy of the context: a few units wait between stages, not a file
    bound_read_ahead(ds.context, object_store_budget(units, high, res.read_ahead_units))
    ds = ds.map_batches(PromptStage, fn_constructor_kwargs=stage_args, batch_size=None,
                        batch_format="pyarrow", num_cpus=PROMPT_CPUS,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=high))
    ds = ds.map_batches(
        GenerateStage, fn_constructor_kwargs=stage_args, batch_size=None,
        batch_format="pyarrow", num_cpus=res.num_cpus_per_actor, num_gpus=res.num_gpus,
        # Two units per actor at a time: an async engine takes the next unit's rows while
        # the last rows of the previous one decode.
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                           max_tasks_in_flight_per_actor=UNITS_IN_FLIGHT,
                                           max_concurrent_calls_per_actor=UNITS_IN_FLIGHT))
    return ds.map_batches(write_units if commit else output_rows,
                          fn_kwargs={"job": job, "config_hash": config_hash},
                          batch_size=None, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                          compute=tasks)


def default_config_path() -> Path:
    """`jobs/default.yaml`, shipped inside the package."""
    return Path(str(resources.files("jobs") / "default.yaml"))

"""Preflight: what a job config promises about its data and model, checked before any engine.

Mistakes that would otherwise show only at run time, row by row (every row `too_long`, every
row an error for a column that is not there, a kept column that is all null) or after an actor's
traceback (a `model.path` that does not exist) fail here at once with a `ConfigError` that
names the config key and what to do. `InfillJob.run()` calls `check_model` and `check_columns`;
`glm-infill validate` shows what they looked at.

Cheap on purpose: the first file's columns (its Parquet footer, or the first lines of JSONL),
the model's `config.json`, tokenizer and weight headers, never the weights themselves or an
engine. Ray is needed only to look at a `model.path` this machine lacks on a remote cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq

from pipeline.glm.checkpoint import (
    WEIGHTS_PREFIX,
    CheckpointError,
    GLMConfig,
    expected_shapes,
    load_config,
    weight_files,
)
from pipeline.glm.tokenization import MASK, GLMTokenizer, TokenizerError, load_tokenizer
from pipeline.job.cluster import cluster_address, connect
from pipeline.job.config import ConfigError, JobConfig, SourceConfig, model_dir, model_name
from pipeline.job.manifest import BYTES_PER_ROW
from pipeline.job.plan import COMPRESSED_SUFFIXES, Unit, file_keys, plan_units
from pipeline.job.policies import Policy, build_prompt
from pipeline.job.retry import with_retries
from pipeline.job.rows import node_id, to_block
from pipeline.job.storage import SourceFormat, file_format, resolve
from schemas.errors import ErrorType

T = TypeVar("T")
Log = Callable[[str], None]
SAMPLE_LINES = 1000  # JSONL: the lines whose keys stand for the file's columns ...
SAMPLE_BYTES = 1 << 20  # ... or fewer, once this many bytes were read

HOW_TO_FIX = {
    "source.text_column": "set it to the column that holds the text",
    "source.id_column": "set it to an existing column, or null for ids from file and row",
    "source.keep_columns": "remove it there (it would be kept as an all-null column)",
    "source.target_column": "set it to the column of the answers, or null to score nothing",
    "prompt.template": "name only existing columns in the template",
}


# -- token budget ---------------------------------------------------------------------------
def prompt_budget(config: JobConfig, max_sequence_length: int) -> int:
    """The most tokens a prompt may have (as `policies.build_prompt` holds it)."""
    return min(config.prompt.budget.max_prompt_tokens or max_sequence_length,
               max_sequence_length)


def _shortest_prompt_too_long(config: JobConfig, tokenizer: GLMTokenizer,
                              max_sequence_length: int) -> str | None:
    """Why even the shortest row would be `too_long` (None when it fits): for a template,
    the template with every column empty; for the other policies a lone mask, which every
    prompt they build is at least."""
    prompt = config.prompt
    if prompt.policy is Policy.TEMPLATE:
        row = dict.fromkeys(template_columns(prompt.template or ""), "")
    else:
        row = {config.source.text_column: MASK}
        prompt = prompt.model_copy(update={"policy": Policy.AS_IS})
    result = build_prompt(row, prompt, tokenizer, max_sequence_length,
                          config.source.text_column)
    return result.error_message if result.error_type == ErrorType.TOO_LONG else None


def check_token_budget(config: JobConfig, glm: GLMConfig, tokenizer: GLMTokenizer) -> None:
    """Budgets under which every row would fail `too_long` are config errors."""
    limit = glm.max_sequence_length
    new_tokens = config.sampling.max_new_tokens
    if new_tokens > limit:
        raise ConfigError(f"sampling.max_new_tokens: {new_tokens} exceeds the model's "
                          f"max_sequence_length {limit} (GLM's block positions), so every row "
                          f"would fail too_long; set it to at most {limit}")
    too_long = _shortest_prompt_too_long(config, tokenizer, limit)
    if too_long is None:
        return
    if config.prompt.policy is Policy.TEMPLATE:
        raise ConfigError(f"prompt.template: even with every column empty the {too_long}, so "
                          "every row would fail too_long; shorten the template or raise "
                          "prompt.budget.max_prompt_tokens")
    raise ConfigError(f"prompt.budget.max_prompt_tokens: leaves no room for any prompt (a lone "
                      f"mask: {too_long}); raise it or leave it unset (the model's {limit})")


# -- model ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Weights:
    files: list[str]
    bytes: int
    tensors: int | None  # None: .bin files, whose shapes only an engine's load checks
    parameters: int | None
    dtypes: list[str]


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    name: str
    path: str
    config: GLMConfig
    tokenizer: str
    tokenizer_size: int
    weights: Weights


def _tensor_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """Shape and dtype of every tensor from the safetensors headers (no tensor data read);
    None for .bin files, which cannot be read without unpickling them."""
    if any(f.suffix != ".safetensors" for f in files):
        return None
    from safetensors import SafetensorError, safe_open

    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensor = handle.get_slice(key)
                    found[key.removeprefix(WEIGHTS_PREFIX)] = (tuple(tensor.get_shape()),
                                                               tensor.get_dtype())
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return found


def _check_shapes(root: Path, glm: GLMConfig, found: dict[str, tuple[tuple[int, ...], str]]
                  ) -> None:
    """The tensors the engines will load, as `checkpoint.load_state_dict` checks them."""
    shapes = expected_shapes(glm)
    for key, shape in shapes.items():
        if key in found and found[key][0] != shape:
            raise CheckpointError(f"{root}: tensor {key!r} has shape {found[key][0]}, expected "
                                  f"{shape} for this config.json")
    missing = [k for k in shapes if k not in found]
    if missing:
        raise CheckpointError(f"{root}: checkpoint lacks {len(missing)} tensor(s), first "
                              f"{missing[0]!r} (expected shape {shapes[missing[0]]})")


def _weights(root: Path, glm: GLMConfig) -> Weights:
    files = weight_files(root)
    found = _tensor_headers(files)
    size = sum(f.stat().st_size for f in files)
    names = [f.name for f in files]
    if found is None:
        return Weights(names, size, None, None, [])
    _check_shapes(root, glm, found)
    used = [found[key] for key in expected_shapes(glm)]
    parameters = sum(math.prod(shape) for shape, _ in used)
    return Weights(names, size, len(found), parameters, sorted({dtype for _, dtype in used}))


def check_engine_settings(config: JobConfig) -> None:
    """Settings the engines would refuse when they start, checked cheaply (no engine) on this
    machine, when it is the one the engines run on: a CUDA device torch cannot see, a vLLM
    CPU KV cache larger than the memory available."""
    import psutil

    from pipeline.engines import engine_options
    from pipeline.engines.base import EngineConfigError, VLLMOptions, check_kv_cache_fits

    model = config.model
    if model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device: cuda, but torch finds no CUDA device on this "
                              "node; set it to cpu, or leave it out (cuda when there is one)")
    options = engine_options(model.engine, model.engine_options)
    if isinstance(options, VLLMOptions) and model.device != "cuda" and options.kv_cache_bytes:
        try:
            check_kv_cache_fits(options.kv_cache_bytes, options.tensor_parallel_size,
                                psutil.virtual_memory().available)
        except EngineConfigError as err:
            raise ConfigError(f"model.engine_options.kv_cache_gb: {err}") from None


def inspect_model(config: JobConfig) -> ModelSummary:
    """Load what describes the model (config.json, tokenizer, weight headers) and check the
    token budget against it. Runs where model.path is (see `near_the_model`)."""
    root = Path(model_dir(config.model))
    if not root.exists():
        node = node_id()
        where = "" if node == "local" else f" on Ray node {node}"
        raise ConfigError(f"model.path: {root} does not exist{where}; give a GLM checkpoint "
                          "directory (config.json, tokenizer files, weights), or null for the "
                          "demo model")
    try:
        glm = load_config(root)
        tokenizer = load_tokenizer(root)
        for role in ("cls_id", "eos_id", "sop_id", "eop_id"):  # what every prompt needs
            getattr(tokenizer, role)
        weights = _weights(root, glm)
        check_token_budget(config, glm, tokenizer)
    except (CheckpointError, TokenizerError) as err:
        raise ConfigError(f"model.path: {err}") from None
    return ModelSummary(model_name(config.model), str(root), glm, type(tokenizer).__name__,
                        len(tokenizer), weights)


def _runs_locally(config: JobConfig) -> bool:
    """The job will start a new local cluster, which sees this machine's files."""
    import ray

    return cluster_address(config) is None and not ray.is_initialized()


def _engine_node(config: JobConfig) -> str | None:
    """A live node the generate actors could be placed on: it has CPUs (the actors take
    some) and GPUs when they take GPUs. So never a head that takes no work (cluster.yaml),
    which need not have the model volume, though a zero-CPU task would land there."""
    import ray

    needs_gpu = config.resources.num_gpus > 0
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("CPU", 0) > 0 and (
                resources.get("GPU", 0) > 0 or not needs_gpu):
            return node["NodeID"]
    return None


def _reported(fn: Callable[..., T], *args: Any) -> tuple[T | None, str | None]:
    """On a Ray worker: a ConfigError comes back as its one-line message, not a traceback."""
    try:
        return fn(*args), None
    except ConfigError as err:
        return None, str(err)


def _on_engine_node(config: JobConfig, log: Log, fn: Callable[..., T], *args: Any
                    ) -> T | None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect(config)
    node = _engine_node(config)
    if node is None:
        log(f"warning: model.path {config.model.path} is not on this machine and no node for "
            "the engines is up yet; it is checked when the engines start")
        return None
    task = ray.remote(num_cpus=0)(_reported).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    result, problem = ray.get(task.remote(fn, *args))
    if problem is not None:
        raise ConfigError(problem)
    return result


def near_the_model(config: JobConfig, log: Log, fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)` where model.path can be read: here when this machine has it or the job
    runs on a local cluster (a missing path is then simply missing), else as one small Ray
    task (num_cpus=0) on a node the engines can use, so a bad path is one line in seconds.
    None when no such node is up yet (an autoscaling cluster)."""
    path = config.model.path
    if path is None or Path(path).exists() or _runs_locally(config):
        return fn(*args)
    return _on_engine_node(config, log, fn, *args)


def check_model(config: JobConfig, log: Log) -> ModelSummary | None:
    """model.path is a loadable GLM checkpoint and the token budget fits it; on a local
    cluster (this machine runs the engines) also the engine settings (ConfigError)."""
    if _runs_locally(config):
        check_engine_settings(config)
    return near_the_model(config, log, inspect_model, config)


# -- source columns -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Columns:
    uri: str
    names: list[str]
    lines: int | None = None  # JSONL: the lines whose keys these are; None: a Parquet schema

    @property
    def where(self) -> str:
        return self.uri if self.lines is None else f"the first {self.lines} lines of {self.uri}"


def template_columns(template: str) -> set[str]:
    """The columns a `template` prompt reads: the field names of its format string."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as err:
        raise ConfigError(f"prompt.template: not a valid format string ({err}); write columns "
                          "as {name} and a literal brace as {{ or }}") from None
    return {name.split(".")[0].split("[")[0] for name in fields}


def _lines(uri: str, source: SourceConfig) -> Iterator[bytes | None]:
    """A JSONL file's lines from its start, as the read stage splits them (None: a line over
    source.max_line_bytes); damage ends them (the run reports it)."""
    from pipeline.job.read import Damaged, read_chunks, split_lines, stream_lines  # Ray Data

    fs, path = resolve(uri, source.storage)
    if uri.lower().endswith(COMPRESSED_SUFFIXES):
        with contextlib.suppress(Damaged):
            yield from stream_lines(fs, path, source.max_line_bytes)
        return
    with fs.open_input_file(path) as handle:
        yield from (line for _, line in split_lines(read_chunks(handle), source.max_line_bytes))


def _jsonl_keys(uri: str, source: SourceConfig) -> Columns | None:
    import json

    keys: set[str] = set()
    lines = read = 0
    with contextlib.closing(_lines(uri, source)) as sample:
        for line in sample:
            lines, read = lines + 1, read + len(line or b"")
            with contextlib.suppress(ValueError):  # a bad line is that row's error
                record = json.loads(line) if line else None
                keys.update(record if isinstance(record, dict) else ())
            if lines == SAMPLE_LINES or read >= SAMPLE_BYTES:
                break
    return Columns(uri, sorted(keys), lines) if keys else None


def _parquet_columns(uri: str, source: SourceConfig) -> Columns | None:
    fs, path = resolve(uri, source.storage)
    try:
        with fs.open_input_file(path) as handle:
            return Columns(uri, pq.read_schema(handle).names)
    except ValueError:  # not Parquet, a corrupt footer: the run lists the file as unreadable
        return None


def source_columns(files: list[str], config: JobConfig) -> Columns | None:
    """The columns of the first file that has any (Parquet footer, or the keys of the first
    JSONL lines); None when no file has."""
    source = config.source

    def columns(uri: str) -> Columns | None:
        read = _parquet_columns if file_format(uri, source.format) is SourceFormat.PARQUET \
            else _jsonl_keys
        return with_retries(lambda: read(uri, source), f"reading the columns of {uri}",
                            config.retry)

    return next((found for uri in files if (found := columns(uri)) is not None), None)


def _wanted_columns(config: JobConfig) -> dict[str, list[str]]:
    """Each config key that names input columns, with the columns it names. The text column
    is read for every policy: the read stage checks every row's text."""
    source, prompt = config.source, config.prompt
    template = prompt.template if prompt.policy is Policy.TEMPLATE else None
    return {"source.text_column": [source.text_column],
            "source.id_column": [source.id_column] if source.id_column else [],
            "source.keep_columns": source.keep_columns,
            "source.target_column": [source.target_column] if source.target_column else [],
            "prompt.template": sorted(template_columns(template)) if template else []}


def column_problems(config: JobConfig, found: Columns) -> list[str]:
    """One line per config key that names a column the first file does not have, or (a
    template) one that `source.columns` leaves out."""
    source = config.source
    wanted = _wanted_columns(config)
    problems = []
    for key, names in wanted.items():
        missing = [name for name in names if name not in found.names]
        if missing:
            problems.append(f"{key}: {', '.join(map(repr, missing))} not found in "
                            f"{found.where} (columns there: {', '.join(found.names)}); "
                            f"{HOW_TO_FIX[key]}")
    if source.columns is not None:
        read = {*source.columns, source.text_column, source.id_column}
        unread = [name for name in wanted["prompt.template"] if name not in read]
        if unread:
            problems.append(f"prompt.template: {', '.join(map(repr, unread))} not in "
                            f"source.columns {source.columns}; add them there")
    return problems


def check_columns(config: JobConfig, files: list[str]) -> None:
    """Every column the config names is in the first file (ConfigError, one line each);
    rows of later files that lack one stay per-row errors."""
    found = source_columns(files, config)
    problems = column_problems(config, found) if found else []
    if problems:
        raise ConfigError("\n".join(problems))


# -- files and sample rows (glm-infill validate) --------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileSummary:
    uri: str
    format: str
    bytes: int
    units: int | None  # None: a compressed stream, cut every source.unit_rows lines
    rows: int | None  # Parquet: from the footer; JSONL: estimated from the bytes
    rows_estimated: bool
    unreadable: str | None = None


def describe_file(uri: str, source: SourceConfig) -> FileSummary:
    """Units and rows as the run plans them; an uncompressed JSONL file larger than a unit
    is not planned here, as planning counts its lines (a pass over all its bytes)."""
    fs, path = resolve(uri, source.storage)
    size = fs.get_file_info(path).size
    fmt = file_format(uri, source.format)
    compressed = fmt is SourceFormat.JSONL and uri.lower().endswith(COMPRESSED_SUFFIXES)
    label = f"{fmt}, compressed" if compressed else str(fmt)
    if fmt is SourceFormat.JSONL and not compressed and size > source.unit_bytes:
        units = -(-size // source.unit_bytes)
        return FileSummary(uri, label, size, units, size // BYTES_PER_ROW, True)
    plan = plan_units([uri], source, set(), set())
    if uri in plan.unreadable:
        return FileSummary(uri, label, size, 0, None, False, plan.unreadable[uri])
    if fmt is SourceFormat.PARQUET:
        return FileSummary(uri, label, size, len(plan.units), plan.rows_known, False)
    units = None if compressed else len(plan.units)
    return FileSummary(uri, label, size, units, plan.bytes_unknown // BYTES_PER_ROW, True)


def sample_rows(uri: str, files: list[str], config: JobConfig, count: int
                ) -> list[dict[str, Any]]:
    """The first `count` rows of `uri` as the read stage makes them (ids, row errors)."""
    from pipeline.job.read import RowMaker, json_row  # imports Ray Data

    source = config.source
    fmt = file_format(uri, source.format)
    rows = RowMaker(Unit(uri, file_keys(files)[uri], fmt), source)
    if fmt is SourceFormat.PARQUET:
        fs, path = resolve(uri, source.storage)
        with fs.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=max(count, 1))
            records = list(itertools.islice(
                (record for batch in batches for record in batch.to_pylist()), count))
        return [rows.finish(rows.row(index, record)) for index, record in enumerate(records)]
    with contextlib.closing(_lines(uri, source)) as lines:
        made = (json_row(rows, index, raw, source.max_line_bytes)
                for index, raw in enumerate(lines))
        return [rows.finish(row) for row in itertools.islice(
            (row for row in made if row is not None), count)]


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    id: str
    row_index: int
    prompt: str | None
    prompt_tokens: int | None  # None: no prompt was built
    target: list[str] | None  # what the policy removed, one entry per blank
    budget_action: str | None
    error_type: str | None
    error_message: str | None


def build_sample_prompts(config: JobConfig, rows: list[dict[str, Any]]) -> list[SamplePrompt]:
    """The rows through the prompt stage itself (`PromptStage`), with each prompt's tokens.
    Runs where model.path is (see `near_the_model`)."""
    from pipeline.job.prompts import PromptStage

    stage = PromptStage(config.model_dump(mode="json"))
    built = stage(to_block(rows)).to_pylist()
    return [SamplePrompt(row["id"], row["row_index"], row["prompt"],
                         len(stage.tokenizer.encode(row["prompt"]))
                         if row["budget_action"] in ("fits", "truncated") else None,
                         row["target"], row["budget_action"], row["error_type"],
                         row["error_message"]) for row in built]


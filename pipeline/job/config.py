"""The job config: one YAML file, validated, overridable with `--set key.sub=value`.

The same `JobConfig` object serves the CLI, the SDK, `ray job submit` and Airflow, so a job
means the same thing wherever it runs. Unknown keys and bad values are rejected with the
dotted key in the message. `config_hash` identifies what a run computes: output, resource,
cluster and engine-tuning settings are left out, so a re-run with more actors, another
`max_num_seqs` or `overwrite` set still matches the outputs it resumes.

Config version 2 moved `prompt.multi_mask` to `sampling.multi_mask` (it decides how blanks are
generated, not how prompts are built); the old key is still read, with a FutureWarning (shown
to CLI users by default, unlike a DeprecationWarning).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.engines import engine_options
from pipeline.engines.base import EngineName
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams, SamplingSettings
from pipeline.job.policies import Policy
from pipeline.job.retry import RetryPolicy
from pipeline.job.storage import SourceFormat, StorageConfig
from schemas.output import OUTPUT_SCHEMA

# Settings that change how the job runs or where it writes, never what a row becomes.
UNHASHED = {"output": True, "resources": True, "ray": True, "retry": True,
            "model": {"engine_options"}, "source": {"skip_unreadable_files"}}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    paths: list[str]
    format: SourceFormat = SourceFormat.AUTO
    id_column: str | None = None
    text_column: str = "text"
    columns: list[str] | None = None
    keep_columns: list[str] = Field(default_factory=list)
    target_column: str | None = Field(None, description="pre-masked rows (policies as_is, "
                                      "template): their answers, a list of strings, so the "
                                      "fills are scored")
    # work units (pipeline/job/plan.py): part of the hash, as they decide the part files
    unit_rows: int = Field(10_000, ge=1, description="Parquet: rows per unit (whole row "
                           "groups); compressed JSONL: lines per unit")
    unit_bytes: int = Field(4 * 2**20, ge=1, description="uncompressed JSONL: bytes per unit")
    max_line_bytes: int = Field(8 * 2**20, ge=1, description="longer JSONL lines are error rows")
    skip_unreadable_files: bool = False  # else an unparsable or damaged file fails the job
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("paths", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one path")
        return value

    @field_validator("keep_columns")
    @classmethod
    def _no_collision(cls, value: list[str]) -> list[str]:
        taken = [name for name in value if name in OUTPUT_SCHEMA.names]
        if taken:
            raise ValueError(f"{taken[0]!r} is an output column; it cannot be kept under "
                             "the same name")
        return value

    @model_validator(mode="after")
    def _kept_columns_are_read(self) -> SourceConfig:
        if self.columns is not None:
            named = {"keep_columns": self.keep_columns,
                     "target_column": [self.target_column] if self.target_column else []}
            for key, names in named.items():
                missing = [c for c in names if c not in self.columns]
                if missing:
                    raise ValueError(f"{key} {missing} are not in columns {self.columns}")
        return self


class OutputConfig(_Section):
    path: str
    overwrite: bool = False
    max_error_rate: float = Field(0.1, ge=0.0, le=1.0)
    progress_interval_s: float = Field(30.0, gt=0)  # a progress line this often (not a TTY)


class ModelConfig(_Section):
    path: str | None = None  # None: the demo checkpoint (pipeline/glm/demo.py)
    engine: EngineName = EngineName.TORCH
    dtype: DType = DType.FLOAT32
    device: Literal["cpu", "cuda"] | None = None
    engine_options: dict[str, Any] = Field(default_factory=dict)  # the engine's typed options

    @model_validator(mode="after")
    def _options_of_the_engine(self) -> ModelConfig:
        try:
            engine_options(self.engine, self.engine_options)
        except ValidationError as err:
            problems = "; ".join(_describe(e, f"engine_options ({self.engine})")
                                 for e in err.errors())
            raise ValueError(problems) from None
        return self


class SamplingConfig(SamplingSettings):
    """The per-blank `SamplingSettings` plus how several blanks are filled. Not the engines'
    `SamplingParams`: their benchmark-only `ignore_eos` is no job setting (an unknown key)."""

    multi_mask: MultiMask = MultiMask.ITERATIVE

    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(exclude={"multi_mask"}))


class SpanPolicyConfig(_Section):
    mask_ratio: float = Field(0.15, gt=0.0, lt=1.0)
    mean_length: float = Field(3.0, gt=0.0)
    max_spans: int = Field(3, ge=1)


class SentencePolicyConfig(_Section):
    max_sentences: int = Field(1, ge=1)


class SuffixPolicyConfig(_Section):
    keep_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    min_keep_words: int = Field(1, ge=0)


class BudgetConfig(_Section):
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: the model's max_sequence_length
    on_overflow: Literal["error", "truncate"] = "error"


class PromptConfig(_Section):
    policy: Policy = Policy.AS_IS
    template: str | None = None
    span: SpanPolicyConfig = Field(default_factory=SpanPolicyConfig)
    sentence: SentencePolicyConfig = Field(default_factory=SentencePolicyConfig)
    suffix: SuffixPolicyConfig = Field(default_factory=SuffixPolicyConfig)
    seed: int = 0
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @model_validator(mode="after")
    def _template_given(self) -> PromptConfig:
        if self.policy is Policy.TEMPLATE and not self.template:
            raise ValueError("policy 'template' needs prompt.template")
        return self


class ResourcesConfig(_Section):
    concurrency: int | tuple[int, int] = 1  # actors of the generate stage: n or [min, max]
    num_gpus: float = Field(0, ge=0)
    num_cpus_per_actor: float = Field(0.5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_in_flight: int = Field(64, ge=1)  # requests per actor (async engines)
    # units per generate actor that may wait, read, in Ray's object store (backpressure.py);
    # 0: Ray Data's own budget, a fraction of the object store
    read_ahead_units: int = Field(4, ge=0)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _actor_count(cls, value: Any) -> Any:
        pair = isinstance(value, list | tuple) and len(value) == 2
        numbers = list(value) if pair else [value]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers) or (
                numbers[0] < 1 or numbers[-1] < numbers[0]):
            raise ValueError(f"must be an integer >= 1 or [min, max] with 1 <= min <= max; "
                             f"got {value!r}")
        return tuple(numbers) if pair else value

    @property
    def actor_range(self) -> tuple[int, int]:
        c = self.concurrency
        return (c, c) if isinstance(c, int) else c


class RayConfig(_Section):
    address: str | None = None  # None: the current cluster, else a new local one
    num_cpus: int | None = Field(None, ge=1)  # only for a new local cluster
    # Workers' own output (engine logs, Ray's task-retry tracebacks) on the driver's terminal;
    # off: the job reports failures itself in one line, the full logs stay in Ray's log files.
    log_to_driver: bool = False


class JobConfig(_Section):
    source: SourceConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Read config version 1's `prompt.multi_mask` as `sampling.multi_mask`."""
        prompt = raw.get("prompt") if isinstance(raw, dict) else None
        if not isinstance(prompt, dict) or "multi_mask" not in prompt:
            return raw
        warnings.warn("prompt.multi_mask is deprecated: write sampling.multi_mask",
                      FutureWarning, stacklevel=2)
        raw = {**raw, "prompt": {k: v for k, v in prompt.items() if k != "multi_mask"}}
        sampling = raw.get("sampling") or {}
        if isinstance(sampling, dict) and "multi_mask" not in sampling:
            raw["sampling"] = {**sampling, "multi_mask": prompt["multi_mask"]}
        return raw

    @model_validator(mode="after")
    def _target_of_pre_masked_rows(self) -> JobConfig:
        if self.source.target_column and self.prompt.policy not in (Policy.AS_IS,
                                                                     Policy.TEMPLATE):
            raise ValueError(f"source.target_column is for policies that remove nothing "
                             f"(as_is, template); policy {self.prompt.policy.value!r} scores "
                             "against what it removed: set source.target_column to null")
        return self

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of everything that decides the output rows."""
        data = self.model_dump(mode="json", exclude=UNHASHED)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _describe(error: dict, prefix: str = "") -> str:
    where = ".".join([prefix, *map(str, error["loc"])] if prefix else map(str, error["loc"]))
    where = where or "config"
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required"
    if kind in ("literal_error", "enum"):
        return f"{where}: must be one of {ctx.get('expected', '')} (got {error['input']!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def validate(raw: dict[str, Any]) -> JobConfig:
    """Build a JobConfig, turning pydantic's report into one line per bad key."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError("invalid job config:\n  " + "\n  ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are YAML (`3`, `true`, `[1, 2]`, `null`)."""
    result = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key.sub=value")
        parts = key.strip().split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[:depth + 1])
                raise ConfigError(f"--set {override!r}: {where} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {override!r}: value is not valid YAML ({err})") from None
    return result


def read_text(path: str | Path) -> str:
    """A local file, or one object streamed with smart-open (s3://, gs://, az://)."""
    from smart_open import open as smart_open

    with smart_open(str(path), "r", encoding="utf-8") as handle:
        return handle.read()


PATH_KEYS = (("source", "paths"), ("output", "path"), ("model", "path"))


def _joined(path: Any, base: str) -> Any:
    """`path` joined to `base` if it is a relative local path (anything else unchanged)."""
    if not isinstance(path, str) or "://" in path or os.path.isabs(path):
        return path
    if "://" in base:
        scheme, prefix = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(prefix, path))}"
    return os.path.normpath(os.path.join(base, path))


def resolve_paths(raw: dict[str, Any], base: str) -> dict[str, Any]:
    """The config with its relative `source.paths`, `output.path` and `model.path` joined to
    `base` (a directory or an object-storage prefix), so a job means the same thing from
    whatever directory (or Ray job working dir) it is started."""
    result = copy.deepcopy(raw)
    for section, key in PATH_KEYS:
        values = result.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values[key]
        values[key] = ([_joined(v, base) for v in value] if isinstance(value, list)
                       else _joined(value, base))
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config (local or object storage, or a mapping given inline as
    `{...}`) and apply `--set` overrides.

    Relative paths written in the file are relative to the file's directory; relative paths
    given as overrides are relative to the working directory (where the user typed them)."""
    path = str(path)
    inline = path.lstrip().startswith("{")  # `glm-infill submit` passes the config itself
    where = "the inline config" if inline else path
    try:
        raw = yaml.safe_load(path if inline else read_text(path)) or {}
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the job config ({err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    folder = (os.getcwd() if inline else path.rsplit("/", 1)[0] if "://" in path
              else os.path.dirname(os.path.abspath(path)))
    raw = apply_overrides(resolve_paths(raw, folder), overrides or [])
    return validate(resolve_paths(raw, os.getcwd()))


def model_dir(model: ModelConfig) -> str:
    """The checkpoint to load: `model.path`, or the demo one shipped in the package (every
    worker that imports `pipeline` has it)."""
    if model.path is not None:
        return model.path
    from pipeline.glm.demo import demo_checkpoint

    return str(demo_checkpoint())


def model_name(model: ModelConfig) -> str:
    """What the output's `model` column says: the path, or the demo checkpoint's name."""
    from pipeline.glm.demo import DEMO_NAME

    return model.path or DEMO_NAME

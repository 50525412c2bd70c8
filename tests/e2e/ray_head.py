"""A real local Ray head for tests, with its own ports and temp dir, stopped by process group.

`ray start --head --block` runs in a new session; every process it starts stays in that
process group, so stopping kills just this head. `ray stop` would kill every Ray process on
the machine, including other people's clusters. Token auth is off (`RAY_AUTH_MODE=disabled`,
design §5) and the venv's bin comes first on PATH so jobs find `ray` and the project.

One head serves every kind of client: the Jobs API (`ray job submit`, Airflow) at `address`,
drivers (`ray.init(address=...)`, `RAY_ADDRESS` for a driver in a subprocess) at
`gcs_address`. Workers inherit the head's environment, not a driver's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port",
                "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                "--object-manager-port")


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out now (held open together, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def head_env() -> dict[str, str]:
    """The environment a head and its job drivers need: auth off, the venv first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


# vLLM on CPU in Ray workers: the engine core in the actor's process (fast start) and a small KV
# cache (2 shared cores); the values of the vLLM engine tests (tests/unit/engines/vllm_helpers.py
# IN_PROCESS). Only vLLM reads them. A worker inherits the head's environment, not its driver's,
# so a test head that runs vLLM jobs needs them (`local_ray_head(env=VLLM_CPU_ENV)`).
VLLM_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclasses.dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard, http://host:port: the Jobs API (`ray job submit`, Airflow)
    gcs_address: str  # host:port: `ray.init(address=...)` and RAY_ADDRESS for drivers


def _wait_ready(url: str, head: subprocess.Popen, log: Path, timeout_s: float,
                token: str | None) -> None:
    """Until the Jobs API answers (with the head's token, if it has one)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}:\n{log.read_text()[-3000:]}")
        request = urllib.request.Request(url, headers=headers)
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after a short grace period.

    (`ray start --block` and the raylet can hang for minutes on SIGTERM once the GCS is gone.)
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2, timeout_s: float = 120,
                   env: dict[str, str | None] | None = None) -> Iterator[RayHead]:
    """Start a head, yield its addresses, always stop it. `env` adds variables to the head's
    environment (so to every worker and job driver), or with None removes them."""
    environment = head_env()
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True))
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *(f"{option}={port}" for option, port in ports.items())]
    head_info = RayHead(address=f"http://127.0.0.1:{ports['--dashboard-port']}",
                        gcs_address=f"127.0.0.1:{ports['--port']}")
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env=environment, start_new_session=True)
    try:
        _wait_ready(head_info.address + "/api/jobs/", head, log, timeout_s,
                    environment.get("RAY_AUTH_TOKEN"))
        yield head_info
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

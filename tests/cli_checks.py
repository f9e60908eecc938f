"""What tests of the command line share: invoking it in process, the one-line error every bad
input must get, and a run killed mid-write for the resume tests."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from step_gguf.cli import main


def cli(*args):
    """`step-gguf ARGS` in this process; every argument as text (paths included)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *words: str) -> str:
    """A refusal: non-zero exit, no traceback, one line of output naming each of `words`."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def cli_process(*args) -> subprocess.CompletedProcess:
    """`step-gguf ARGS` as a child process, run to completion (as a user runs it, and as a killed
    run is restarted); its output captured as text."""
    return subprocess.run([sys.executable, "-m", "step_gguf.cli", *map(str, args)], capture_output=True, text=True)


def uninterrupted(folder: Path, *args) -> list[Path]:
    """The files `step-gguf ARGS -o FOLDER/m.gguf` writes when left to finish: what a killed and
    resumed run must reproduce byte for byte (same file name: it is part of the metadata)."""
    folder.mkdir()
    done = cli_process(*args, "-o", folder / "m.gguf")
    assert done.returncode == 0, done.stderr
    return sorted(folder.iterdir())


def run_killed(args: list[str], journal: Path, after_tensors: int, rng: random.Random) -> None:
    """Start `step-gguf ARGS`, wait until `journal` shows `after_tensors` complete tensors, then
    SIGKILL it a random moment later (mostly mid-tensor), whatever the machine's speed."""
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(journal.read_text())["written"][0] >= after_tensors:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# `plan` on a small custom machine, as JSON
PLAN_ARGS = ["--profile", "custom", "--ram", "1", "--mem-bw", "10", "--vram", "0.5", "--gpu-bw",
             "100", "-c", "256", "--json"]

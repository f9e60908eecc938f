"""Child processes of llama.cpp's binaries: a tool run to completion (`run`), and a server
kept running for a block (`child`) that dies with this process."""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import StepGGUFError

log = logging.getLogger(__name__)

# the mark llama.cpp's --log-prefix puts before an error line
_ERROR_PREFIX = "E "


def error_line(line: str) -> str | None:
    """The message of a line llama.cpp's log prefix marks as an error."""
    return line[len(_ERROR_PREFIX):].strip() if line.startswith(_ERROR_PREFIX) else None


def run(args: Sequence[str | os.PathLike], what: str, *, env: dict[str, str] | None = None,
        log_file: Path | None = None, on_line: Callable[[str], None] | None = None,
        separators: str = "\n") -> None:
    """Run `args` to completion; stdout and stderr go, together, to `log_file` and, cut at any of
    `separators`, line by line to `on_line`.

    A non-zero exit raises a one-line StepGGUFError "`what` failed: <line>", where <line> is the
    last line marked as an error by llama.cpp's log prefix, or else the last non-blank one.
    """
    argv = [str(a) for a in args]
    log.debug("running %s", " ".join(argv))
    cut = re.compile("[" + re.escape(separators) + "]")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    last = error = ""

    def take(line: str) -> None:
        nonlocal last, error
        line = line.rstrip()
        if line.strip():
            last = line
            error = error_line(line) or error
        if on_line:
            on_line(line)

    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise StepGGUFError(f"{what} failed: cannot start {argv[0]} ({exc.strerror})") from None
    assert proc.stdout is not None
    with proc, open(log_file or os.devnull, "w", buffering=1) as sink:
        try:
            pending = ""
            # read1: whatever the child has written so far, so progress without newlines shows
            while chunk := proc.stdout.read1(1 << 16):
                text = decoder.decode(chunk)
                sink.write(text)
                *lines, pending = cut.split(pending + text)
                for line in lines:
                    take(line)
            take(pending + decoder.decode(b"", final=True))
        except BaseException:  # a callback raised, or Ctrl-C: do not leave the tool running
            proc.kill()
            raise
        if proc.wait() != 0:
            where = f"; full log: {log_file}" if log_file else ""
            raise StepGGUFError(f"{what} failed: {error or last or 'no output'}{where}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the server's child process: have Linux end it when its parent dies, even by
    SIGKILL, so that a killed `step-gguf serve` leaves no server holding the model and port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def child(args: Sequence[str], what: str, ready: Callable[[], bool], startup_timeout: float,
          log_path: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run a server process (from our build) for the block's duration, once `ready()` says
    it is up; it dies with this process, and is stopped at the end of the block."""
    sink = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    see = f"; see {log_path}" if log_path else ""
    try:
        deadline = time.monotonic() + startup_timeout
        while not ready():
            if proc.poll() is not None:
                raise StepGGUFError(f"{what}: exited with code {proc.returncode}{see}")
            if time.monotonic() > deadline:
                raise StepGGUFError(f"{what}: not up after {startup_timeout:.0f}s{see}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)
        if log_path:
            sink.close()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a child server: SIGTERM, then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

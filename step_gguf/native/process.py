"""Child processes of llama.cpp's binaries: a tool run to completion (`run`), and a server
kept running for a block (`child`) that dies with this process and can be kept up (`Child`)."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

from ..core.errors import StepGGUFError

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


def exit_reason(returncode: int) -> str:
    """How a child ended, from its return code: "was killed by SIGSEGV", "exited with code 1"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Child:
    """A server process of ours: its command line, where its output goes, how to tell it is up,
    and (`keep_up`) its restarts when it dies."""

    args: list[str]
    what: str  # what it is doing, for errors at start: "llama-server loading m.gguf"
    ready: Callable[[], bool]
    startup_timeout: float
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)   # added to this process's environment
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _sink: IO | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return Path(self.args[0]).name

    def start(self, restart: bool = False) -> None:
        """Start it and wait until `ready()`; a restart appends to the log. On failure the
        process is gone and a one-line StepGGUFError says why."""
        if self.log_path:
            self._sink = open(self.log_path, "a" if restart else "w", buffering=1)
            if restart:
                self._sink.write(f"\n--- step-gguf: {self.name} restarted ---\n")
        self.proc = subprocess.Popen(self.args, stdout=self._sink or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                     env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready():
            if self.proc.poll() is not None:
                self.stop()
                raise StepGGUFError(f"{self.what}: {exit_reason(self.proc.returncode)}{self._see()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StepGGUFError(f"{self.what}: not up after {self.startup_timeout:.0f}s{self._see()}")
            time.sleep(0.1)

    def died(self) -> str | None:
        """One line on how it ended, if it has; None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"{self.name} {exit_reason(self.proc.returncode)}{self._see()}"

    def keep_up(self, on_event: Callable[[str], None], give_up_after: int = 5,
                window: float = 300.0, backoff: float = 1.0) -> None:
        """Block while it runs. Each time it dies: say why (`on_event`), restart it with the same
        command line after `backoff` seconds, doubled each death in the window (30 s at most),
        and say when it is up again. The `give_up_after`-th death within `window` seconds raises
        a StepGGUFError with the log's last lines."""
        assert self.proc is not None
        deaths: list[float] = []
        while True:
            self.proc.wait()
            why = self.died()
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < window] + [now]
            if len(deaths) >= give_up_after:
                raise StepGGUFError(f"{why}, {len(deaths)} times within {window:.0f} s; not restarting "
                                    f"it again.{self._tail()}")
            delay = min(backoff * 2 ** (len(deaths) - 1), 30.0)
            on_event(f"{why}; restarting it in {delay:g} s")
            self.stop()
            time.sleep(delay)
            try:
                self.start(restart=True)
            except StepGGUFError as exc:
                on_event(str(exc))
                continue
            on_event(f"{self.name} is up again")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            stop(self.proc, grace)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _see(self) -> str:
        return f"; its log: {self.log_path}" if self.log_path else ""

    def _tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        last = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f" The last lines of {self.log_path}:\n" + "\n".join(f"  {line}" for line in last)


@contextlib.contextmanager
def child(args: Sequence[str], what: str, ready: Callable[[], bool], startup_timeout: float,
          log_path: Path | None = None, env: dict[str, str] | None = None) -> Iterator[Child]:
    """Run a server process (from our build) for the block's duration, once `ready()` says
    it is up; it dies with this process, and is stopped at the end of the block. An error in
    the block while the process is dead becomes one line saying how it died."""
    proc = Child([str(a) for a in args], what, ready, startup_timeout, log_path, env or {})
    proc.start()
    try:
        yield proc
    except Exception:
        if why := proc.died():
            raise StepGGUFError(why) from None
        raise
    finally:
        proc.stop()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a child server: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

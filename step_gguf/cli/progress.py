"""What the CLI shows of long work on stderr: byte counts of conversions, stages and compile
steps of a build."""

from __future__ import annotations

import sys
import time

import click


class ByteBar:
    """A progress bar on stderr that counts bytes, shown only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def start(self, total: int) -> None:
        if not sys.stderr.isatty():
            return
        self.bar = click.progressbar(length=total, label=self.label, show_eta=True,
                                     show_percent=True, file=sys.stderr,
                                     item_show_func=lambda _: None)
        self.bar.__enter__()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class StepProgress:
    """Stages and compile steps of a long build on stderr: a bar of steps done of total on a
    terminal, else (CI, a log file) a line at every tenth of the steps, with the time taken."""

    def __init__(self) -> None:
        self.start, self.bar, self.shown, self.total = time.monotonic(), None, -1, 0

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60}m{s % 60:02d}s"

    def stage(self, what: str) -> None:
        self.close()
        click.echo(f"{what} ... ({self._elapsed()})", err=True)

    def step(self, done: int, total: int) -> None:
        if total != self.total:  # a new count: ninja's re-check of globbed folders ([0/2]), then the build
            self.total, self.shown = total, -1
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=total, label="compile steps", show_pos=True,
                                             show_eta=True, file=sys.stderr)
                self.bar.__enter__()
            self.bar.length = total
            self.bar.update(done - self.bar.pos)
        elif (tenth := 10 * done // max(total, 1)) > self.shown:
            self.shown = tenth
            click.echo(f"  compiled {done}/{total} steps ({self._elapsed()})", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

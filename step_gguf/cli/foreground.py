"""A server kept in the foreground of a command until Ctrl-C or SIGTERM (`serve`,
`rpc-server`): its address on stdout for scripts, what it is on stderr."""

from __future__ import annotations

import contextlib
import signal
import sys

import click


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server the way Ctrl-C does


def hold_until_stopped(server, announce: str) -> None:
    """Keep the `server` context open until Ctrl-C or SIGTERM. It yields (address, wait):
    print the address alone on stdout for scripts, `announce` (formatted with it) on stderr,
    then `wait()` (which keeps the server up, or raises when it cannot)."""
    # SIGINT too: a process started in the background inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler of its own
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        with server as (address, wait):
            click.echo(announce.format(address), err=True)
            click.echo(address)
            sys.stdout.flush()
            wait()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@contextlib.contextmanager
def paused(server):
    """A server context yielding its address, as hold_until_stopped takes it."""
    with server as address:
        yield address, signal.pause

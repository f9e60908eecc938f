"""llama.cpp's RPC hosts: our `ggml-rpc-server` as a child process, the memory each host
offers the planner, and the in-process devices a plan with RPC hosts loads onto.

ggml's RPC protocol has no authentication and aborts the calling process when a handshake
fails, so hosts are probed first (a TCP connect, then llama-server's device list in a child
process) and only registered in this process once they have answered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

from ..core.errors import StepGGUFError
from ..native.installed import check
from ..native.process import child, free_port
from ..plan import GiB, RpcHost
from .devices import rpc_device

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052  # ggml-rpc-server's own default
_START = "start one there with `step-gguf rpc-server --host ADDRESS` (from the same step-gguf)"


def split_endpoint(text: str) -> tuple[str, int]:
    """("host", port) of "host:port"; a one-line error otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StepGGUFError(f"RPC host {text!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    return host.strip("[]"), int(port)


def parse(spec: str) -> list[tuple[str, int | None]]:
    """`--rpc HOST:PORT[=GiB],...`: endpoints in order, each with the memory the plan may use
    there when given (otherwise the host is asked)."""
    out: list[tuple[str, int | None]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        endpoint, sep, gib = item.partition("=")
        split_endpoint(endpoint)
        memory = None
        if sep:
            try:
                memory = int(float(gib) * GiB)
            except ValueError:
                memory = -1
            if not memory > 0:
                raise StepGGUFError(f"RPC host {item!r}: the memory after '=' must be a positive "
                                    "number of GiB")
        out.append((endpoint.strip(), memory))
    if not out:
        raise StepGGUFError("--rpc needs at least one HOST:PORT")
    if len({e for e, _ in out}) != len(out):
        raise StepGGUFError("--rpc names the same host twice")
    return out


def _refused(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to `endpoint` fails, or None when it succeeds."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


_DEVICE_LINE = re.compile(r"^\s*RPC\d+: (\S+) \((\d+) MiB, (\d+) MiB free\)", re.M)


def memory(endpoints: Sequence[str]) -> dict[str, int]:
    """Free bytes each host's device reports, asked through llama-server's device list in a
    child process (a failed handshake aborts that process, not this one)."""
    for e in endpoints:
        if why := _refused(e):
            raise StepGGUFError(f"cannot reach the RPC host {e} ({why}); {_START}")
    server = check().tool("llama-server")
    try:
        out = subprocess.run([str(server), "--rpc", ",".join(endpoints), "--list-devices"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise StepGGUFError(f"the RPC hosts {', '.join(endpoints)} did not answer in 60 s; "
                            f"{_START}") from None
    found = {m[1]: int(m[3]) << 20 for m in _DEVICE_LINE.finditer(out.stdout + out.stderr)}
    missing = [e for e in endpoints if e not in found]
    if out.returncode or missing:
        last = (out.stderr.strip().splitlines() or ["no answer"])[-1]
        raise StepGGUFError(f"{', '.join(missing or endpoints)} did not answer as a ggml RPC "
                            f"server ({last}); {_START}")
    return found


def hosts(spec: str, bandwidth: float) -> list[RpcHost]:
    """The planner's view of `--rpc HOST:PORT[=GiB],...`: hosts without a given size are
    asked for their free memory. Their memory is taken to read at `bandwidth` (B/s)."""
    items = parse(spec)
    asked = memory([e for e, mem in items if mem is None]) if any(m is None for _, m in items) else {}
    return [RpcHost(e, mem if mem is not None else asked[e], bandwidth) for e, mem in items]


_registered: dict[str, int] = {}


def devices(endpoints: Sequence[str]) -> list[int]:
    """ggml devices (pointers) of the RPC hosts, registered in this process once each."""
    new = [e for e in endpoints if e not in _registered]
    if new:
        memory(new)  # probe first: a failed handshake in-process would abort it
        for e in new:
            _registered[e] = rpc_device(e)
    return [_registered[e] for e in endpoints]


@contextlib.contextmanager
def start(port: int | None = None, host: str = "127.0.0.1", threads: int | None = None,
          log_path: Path | None = None, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run our ggml-rpc-server for the block's duration; yields its HOST:PORT."""
    binary = check().tool("ggml-rpc-server")
    port = port or free_port()
    args = [str(binary), "-H", host, "-p", str(port), "-t", str(threads or os.cpu_count() or 1)]
    endpoint = f"{host}:{port}"
    with child(args, f"ggml-rpc-server on {endpoint} (is the port taken?)",
                     lambda: _refused(endpoint, timeout=1.0) is None, startup_timeout, log_path):
        log.info("ggml-rpc-server listening on %s", endpoint)
        yield endpoint

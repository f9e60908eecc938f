"""A soak of `step-gguf serve`: 8 clients for 10 minutes against the scripted tool-calling model
(MTP drafting on, an API key), each at random: a chat with a prompt of random length, a tool
round (the call, then the answer to its result), an Anthropic /v1/messages request, or a stream it
cancels at a random point.

    python bench/soak.py [--work DIR] [--minutes 10] [--clients 8] [--parallel 2]

It prints p50/p99 latency per kind of request, errors (5xx, dropped connections), client errors
(4xx: none are sent, so any is a finding), how many times serve restarted llama-server, and the
server's resident memory after the warm-up, at its largest and at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from _common import description, work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scripted import ASK, TOOLS, children, resident_bytes, scripted_checkpoint  # noqa: E402  (the model the tests talk to)

KEY = "soak"
WORDS = "the experts of each layer run where the plan put them while the cache holds the context".split()


class Target:
    def __init__(self, port: int):
        self.port = port

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                          "Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def cancel(self, body: dict, after: int) -> None:
        data = json.dumps({**body, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=300) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            got = 0
            while got < after and (chunk := s.recv(4096)):
                got += len(chunk)


def _prompt(rng: random.Random) -> list[dict]:
    # lengths of a long tail, within a slot's context (4096 tokens with the template)
    words = rng.choices(WORDS, k=int(rng.paretovariate(1.2) * 20) % 1500)
    return [{"role": "user", "content": " ".join(words) + " What is the weather in Paris?"}]


def one_request(t: Target, rng: random.Random) -> tuple[str, int]:
    """One random request; its kind and the worst HTTP status it got (0: none, cancelled)."""
    kind = rng.choice(["chat", "tool round", "anthropic", "cancelled stream"])
    chat = {"messages": _prompt(rng), "max_tokens": rng.randint(1, 64), "tools": TOOLS}
    if kind == "chat":
        return kind, t.post("/v1/chat/completions", chat)[0]
    if kind == "cancelled stream":
        t.cancel(chat, rng.randint(0, 2000))
        return kind, 0
    if kind == "anthropic":
        return kind, t.post("/v1/messages", {"model": "step", "max_tokens": chat["max_tokens"],
                                             "messages": chat["messages"]})[0]
    status, out = t.post("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "max_tokens": 64})
    if status != 200 or not (calls := out["choices"][0]["message"].get("tool_calls")):
        return kind, status
    history = [*ASK, out["choices"][0]["message"],
               {"role": "tool", "tool_call_id": calls[0].get("id", ""), "content": '{"sky": "clear"}'}]
    return kind, max(status, t.post("/v1/chat/completions", {"messages": history, "tools": TOOLS,
                                                             "max_tokens": 32})[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=None, help="folder for the scripted model [a temporary one]")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=2, help="the server's slots")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from step_gguf.pipeline.convert import convert

    work = work_dir(args.work, "step-gguf-soak-")
    model = work / "scripted.gguf"
    if not model.exists():
        convert(scripted_checkpoint(work / "scripted"), model, outtype="bf16")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(model), "--port", str(port),
                              "-c", "16384", "--parallel", str(args.parallel), "--api-key", KEY],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(iter(serve.stderr.readline, "")), daemon=True).start()
    if not serve.stdout.readline():
        sys.exit(f"serve did not start: {''.join(said)}")
    target = Target(port)
    target.post("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "max_tokens": 64})  # warm up
    start_rss = peak_rss = resident_bytes(children(serve.pid)[0])

    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[int, int] = defaultdict(int)
    failures: list[str] = []
    end = time.monotonic() + args.minutes * 60

    def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        while time.monotonic() < end:
            begun = time.perf_counter()
            try:
                kind, status = one_request(target, rng)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures.append(repr(exc))
                time.sleep(0.5)  # a server being restarted refuses connections: do not spin
                continue
            statuses[status] += 1
            if status == 200:
                latencies[kind].append(time.perf_counter() - begun)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(5)
        try:
            peak_rss = max(peak_rss, resident_bytes(children(serve.pid)[0]))
        except (OSError, IndexError, ValueError):  # between a death and its restart
            pass
    end_rss = resident_bytes(children(serve.pid)[0])
    serve.send_signal(signal.SIGINT)
    serve.wait(timeout=60)

    print(f"{args.clients} clients for {args.minutes:g} min, {args.parallel} slots, scripted model, MTP on")
    print(f"{'request':>18} {'n':>6} {'p50 s':>8} {'p99 s':>8}")
    for kind, times in sorted(latencies.items()):
        q = statistics.quantiles(times, n=100) if len(times) > 1 else times * 99
        print(f"{kind:>18} {len(times):>6} {q[49]:>8.3f} {q[98]:>8.3f}")
    print(f"cancelled streams: {statuses.get(0, 0)}")
    print(f"client errors (4xx): {sum(n for s, n in statuses.items() if 400 <= s < 500)}")
    print(f"errors: {sum(n for s, n in statuses.items() if s >= 500)} 5xx, {len(failures)} dropped"
          + (f" (first: {failures[0]})" if failures else ""))
    print(f"restarts: {sum('restarting' in line for line in said)}")
    print(f"server memory: {start_rss / 2**20:.1f} MiB after warm-up, {peak_rss / 2**20:.1f} peak, "
          f"{end_rss / 2**20:.1f} at the end ({end_rss / start_rss - 1:+.1%})")


if __name__ == "__main__":
    main()

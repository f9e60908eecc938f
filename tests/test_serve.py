"""`step-gguf serve` and `run` on a scripted model with Step 3.5 Flash's own chat template:
reasoning, tool calls and MTP drafting checked on real runtime output, over HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from scripted import ASK, REASONING, TOOLS, children, scripted_checkpoint, start_serve
from step_gguf.cli import main

@pytest.fixture(scope="module")
def scripted(workdir, runtime):
    from step_gguf.pipeline.convert import convert

    out = workdir / "scripted.gguf"
    if not out.exists():
        convert(scripted_checkpoint(workdir / "scripted"), out, outtype="bf16")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(scripted):
    port = _free_port()
    # started as a shell starts a background job, with SIGINT ignored: Ctrl-C (a SIGINT from
    # anyone) must stop it all the same
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(scripted),
                             "--port", str(port), "-c", "2048"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = proc.stdout.readline().strip()   # printed once the server is healthy
    assert url == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if not url else url
    yield proc, url.removesuffix("/v1"), port
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_reasoning_and_tool_call_are_parsed(served):
    from step_gguf.runtime import server

    _, url, _ = served
    reply = server.chat(url, ASK, tools=TOOLS, max_tokens=64)
    assert reply.reasoning.strip() == "".join(REASONING)
    assert reply.text.strip() == ""
    [call] = reply.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_streaming_gives_the_same_reply(served):
    from step_gguf.runtime import server

    _, url, _ = served
    pieces: list[tuple[str, str]] = []
    reply = server.chat(url, ASK, tools=TOOLS, max_tokens=64, on_text=lambda k, t: pieces.append((k, t)))
    assert len(pieces) > 1   # really streamed
    assert "".join(t for k, t in pieces if k == "reasoning").strip() == "".join(REASONING)
    [call] = reply.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_sixteen_concurrent_clients(served):
    from step_gguf.runtime import server

    _, url, _ = served
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: server.chat(url, ASK, tools=TOOLS, max_tokens=64,
                                                     seed=i), range(16)))
    assert all(r.tool_calls and r.tool_calls[0]["function"]["name"] == "get_weather"
               for r in replies)


def test_ctrl_c_exits_zero_and_frees_the_port(served):
    proc, _, port = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))   # nobody listens any more
    with socket.socket() as s:
        # a new server can take the port (closed client connections may linger in TIME_WAIT,
        # which servers, llama-server included, bind through with SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_run_json_reports_mtp_acceptance_and_keeps_greedy_tokens(scripted):
    """The same answer drafting with the adaptive default, three tokens a round, and not at all;
    the JSON reports what was drafted and accepted, and the rounds by draft length."""
    runner = CliRunner()
    outs = {}
    for flags in ((), ("--draft-max", "3"), ("--no-mtp",)):
        r = runner.invoke(main, ["run", str(scripted), "-p", "weather?", "-n", "32", "--json", *flags])
        assert r.exit_code == 0, r.output
        outs[flags] = json.loads(r.stdout)
    adaptive, fixed, plain = outs[()], outs["--draft-max", "3"], outs["--no-mtp",]
    for drafted in (adaptive, fixed):
        assert (drafted["text"], drafted["reasoning"]) == (plain["text"], plain["reasoning"])
    assert plain["reasoning"].strip() == "".join(REASONING)
    # the heads are right wherever the script goes on (a draft past its end is not)
    assert fixed["mtp"]["drafted"] > 0 and fixed["mtp"]["acceptance"] >= 0.9
    assert adaptive["mtp_draft_max"] == "adaptive" and fixed["mtp_draft_max"] == 3
    assert sum(adaptive["mtp"]["rounds_by_draft_length"]) > 0
    assert plain["mtp"]["drafted"] == 0 and plain["mtp_draft_max"] is None


def test_a_killed_serve_takes_its_server_with_it(scripted):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(scripted),
                             "--port", str(port), "-c", "512"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip().endswith(f":{port}/v1")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    pytest.fail("llama-server outlived a SIGKILLed step-gguf serve")


def test_serving_beyond_loopback_needs_a_key(scripted):
    r = CliRunner().invoke(main, ["serve", str(scripted), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "--api-key" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_api_key_is_enforced(scripted):
    from step_gguf.core.errors import StepGGUFError
    from step_gguf.runtime import server

    with server.serve(scripted, n_ctx=512, api_key="sesame") as url:
        with pytest.raises(StepGGUFError, match="401"):
            server.chat(url, ASK, max_tokens=4)
        assert server.chat(url, ASK, max_tokens=4, api_key="sesame").completion_tokens > 0


def test_serve_on_ipv6_loopback_answers(scripted):
    """`--host ::1` is loopback too: the address printed is a valid URL ([::1] in brackets) and
    a client reaches the server through it."""
    from step_gguf.runtime import server

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(scripted), "--host", "::1",
                             "--port", str(port), "-c", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://[::1]:{port}/v1", proc.stderr.read() if not url else url
        assert server.chat(url.removesuffix("/v1"), ASK, max_tokens=4).completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8080"), ("0.0.0.0", "http://127.0.0.1:8080"),
                                       ("::1", "http://[::1]:8080"), ("::", "http://[::1]:8080"),
                                       ("192.168.1.5", "http://192.168.1.5:8080")])
def test_base_url_of_each_bind_address(host, url):
    from step_gguf.runtime.server import base_url

    assert base_url(host, 8080) == url


ROUNDS = 12


def _tool_loop(url: str, city: str) -> list[tuple[int, int]]:
    """An agent's loop: ask, get the call, answer it with the tool's result, ROUNDS times;
    (prompt tokens, prompt tokens evaluated) of each round."""
    from step_gguf.runtime import server

    messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
    seen = []
    for i in range(ROUNDS):
        reply = server.chat(url, messages, tools=TOOLS, max_tokens=64)
        [call] = reply.tool_calls
        seen.append((reply.prompt_tokens, reply.prompt_evaluated))
        messages += [{"role": "assistant", "content": reply.text, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call.get("id") or f"call{i}",
                      "content": json.dumps({"city": city, "round": i, "celsius": 10 + i})}]
    return seen


def test_a_tool_loop_on_each_of_two_slots_evaluates_only_its_new_tokens(scripted):
    """Two agents at once through `serve --parallel 2`, twelve tool rounds each: every round
    evaluates only what the round added to the conversation (+64 for the template's seams),
    not the whole history, so each conversation keeps its own slot and cache."""
    proc, url, _ = start_serve(scripted, "-c", "4096", "--parallel", "2")
    try:
        with ThreadPoolExecutor(2) as pool:
            loops = list(pool.map(lambda city: _tool_loop(url.removesuffix("/v1"), city), ["Paris", "Oslo"]))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    for seen in loops:
        assert seen[-1][0] > 2 * seen[0][0]  # the history grew
        for (before, _), (total, evaluated) in zip(seen, seen[1:]):
            assert evaluated <= total - before + 64, seen


def _server_of(serve_pid: int) -> int:
    """The pid of the llama-server a `step-gguf serve` runs (its one child)."""
    [pid] = children(serve_pid)
    return pid


def _said_until(proc: subprocess.Popen, last: str, timeout: float = 120) -> list[str]:
    """serve's stderr lines up to one containing `last` (the process is killed past `timeout`)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    said = []
    try:
        while not (said and last in said[-1]):
            line = proc.stderr.readline()
            assert line, f"serve ended before saying {last!r}: {said}"
            said.append(line.strip())
    finally:
        watchdog.cancel()
    return said


def test_serve_restarts_a_killed_server(scripted):
    """SIGKILL to llama-server under serve: serve names the signal and the log it named at
    start, restarts it, says so, and the next request gets the scripted answer."""
    from step_gguf.runtime import server

    proc, api, said = start_serve(scripted, "-c", "1024")
    try:
        [log] = [line.split(": ", 1)[1] for line in said if line.startswith("llama-server log: ")]
        first = _server_of(proc.pid)
        os.kill(first, signal.SIGKILL)
        told = _said_until(proc, "up again")
        assert told[0] == f"llama-server was killed by SIGKILL; its log: {log}; restarting it in 1 s", told
        assert told[-1] == "llama-server is up again" and _server_of(proc.pid) != first
        reply = server.chat(api.removesuffix("/v1"), ASK, max_tokens=64)
        assert reply.reasoning.strip() == "".join(REASONING)
        assert "restarted" in Path(log).read_text()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_run_reports_a_dead_server_in_one_line(scripted, monkeypatch):
    """llama-server dies under `run` while it answers: one line saying how, no traceback."""
    from step_gguf.runtime import server

    real_chat = server.chat

    def chat_after_a_crash(url, *args, **kw):
        os.kill(_server_of(os.getpid()), signal.SIGSEGV)
        time.sleep(0.5)
        return real_chat(url, *args, **kw)

    monkeypatch.setattr(server, "chat", chat_after_a_crash)
    r = CliRunner().invoke(main, ["run", str(scripted), "-c", "1024", "-p", ASK[0]["content"]])
    assert r.exit_code == 1, r.output
    [line] = r.output.strip().splitlines()[-1:]
    assert line.startswith("Error: llama-server was killed by SIGSEGV; its log: "), r.output
    assert "Traceback" not in r.output


def test_a_server_that_keeps_dying_is_given_up_with_its_last_words(tmp_path):
    """The third death within the window: no more restarts, an error with the log's last lines;
    each death before it was told, with a restart after a doubling delay."""
    from step_gguf.core.errors import StepGGUFError
    from step_gguf.native.process import child

    log = tmp_path / "server.log"
    dying = [sys.executable, "-c", "import sys, time; print('out of cheese', flush=True); time.sleep(0.2); sys.exit(3)"]
    events = []
    with child(dying, "a dying server", lambda: True, 5, log) as proc:
        with pytest.raises(StepGGUFError) as err:
            proc.keep_up(events.append, give_up_after=3, backoff=0.01)
    assert events == [f"{proc.name} exited with code 3; its log: {log}; restarting it in 0.01 s",
                      f"{proc.name} is up again",
                      f"{proc.name} exited with code 3; its log: {log}; restarting it in 0.02 s",
                      f"{proc.name} is up again"]
    assert str(err.value).startswith(f"{proc.name} exited with code 3; its log: {log}, 3 times within 300 s")
    assert str(err.value).endswith("  out of cheese")
    assert log.read_text().count("out of cheese") == 3


MTP_ON = ["--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]


def _drafted(url: str, path: str, body: dict) -> dict:
    """A request's reply, which must have drafted with MTP acceptance >= 0.9."""
    req = urllib.request.Request(f"{url}{path}", json.dumps({**body, "temperature": 0}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        out = json.load(resp)
    t = out["timings"]
    assert t.get("draft_n", 0) > 0 and t["draft_n_accepted"] / t["draft_n"] >= 0.9, t
    return out


def test_mtp_drafts_after_a_slot_is_restored_from_the_prompt_cache(scripted, tmp_path):
    """llama-server swaps a slot's cache for a saved prompt when a request shares little with it:
    the heads' history of that slot is then stale. Before patch 0015 the heads drafted nothing
    after such a swap (their cache "not continuous"), and a prompt chunk in the same state
    failed the whole batch with a 500."""
    from step_gguf.runtime import server

    a = [{"role": "user", "content": "What is the weather in Paris? " * 30}]
    b = [{"role": "user", "content": "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 25}]
    log = tmp_path / "server.log"
    with server.serve(scripted, n_ctx=8192, log_path=log, extra_args=["-np", "1", *MTP_ON]) as url:
        for messages in (a, b, [*a, {"role": "assistant", "content": "Let me see."}, *ASK], b, a):
            _drafted(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 48})
    assert "not continuous" not in log.read_text() and "starts over" not in log.read_text()


def test_mtp_catch_up_longer_than_a_batch(scripted, tmp_path):
    """A prompt chunk of a full batch after generated tokens the heads have not caught up: the
    heads decode those rows with the chunk. Before patch 0015 that overflowed the draft batch
    and aborted llama-server."""
    from step_gguf.runtime import server

    prompt = "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    log = tmp_path / "server.log"
    with server.serve(scripted, n_ctx=8192, log_path=log, extra_args=["-np", "1", "-b", "512", "-ub", "512", *MTP_ON]) as url:
        first = _drafted(url, "/completion", {"prompt": prompt, "n_predict": 12, "cache_prompt": True})
        longer = _drafted(url, "/completion", {"prompt": prompt + first["content"] + " word" * 1000,
                                               "n_predict": 8, "cache_prompt": True})
    assert longer["tokens_cached"] > 1000
    assert "starts over" not in log.read_text()

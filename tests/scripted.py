"""The scripted model the server tests talk to: greedy decoding (and every MTP head) emits a
reasoning block, then a Step 3.5 tool call, under Step 3.5 Flash's own chat template."""

from __future__ import annotations

from pathlib import Path

REASONING = ["The user", " wants", " the weather", " in Paris."]
CALL = ["\n</think>\n", "<tool_call>\n<function=get_weather>\n",
        "<parameter=city>\nParis\n</parameter>\n", "</function>\n</tool_call>"]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "parameters": SCHEMA}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def scripted_checkpoint(folder: Path) -> Path:
    """The checkpoint, made once. A 4096-token context: the template's tool prompt alone is
    ~700 tokens."""
    from step_gguf.native.build import STEP35_TEMPLATE, sdist_text
    from step_gguf.synth.writer import synth

    if not folder.exists():
        synth(folder, "tiny", script=REASONING + CALL, chat_template=sdist_text(STEP35_TEMPLATE),
              rope_orig_ctx=1024)
    return folder


GREETING = ["Bonjour", " from", " the", " page", "."]


def greeting_checkpoint(folder: Path) -> Path:
    """A scripted checkpoint whose every answer is the plain text of GREETING (the template
    opens a reasoning block, which the script closes at once)."""
    from step_gguf.native.build import STEP35_TEMPLATE, sdist_text
    from step_gguf.synth.writer import synth

    if not folder.exists():
        synth(folder, "tiny", script=["\n</think>\n", *GREETING], chat_template=sdist_text(STEP35_TEMPLATE),
              rope_orig_ctx=1024)
    return folder


def start_serve(model: Path, *flags: str):
    """`step-gguf serve MODEL FLAGS...` as a user starts it, on a free port: (the process, the
    API address it printed on stdout, its stderr lines up to the "serving ..." announcement)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(model), "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    api = proc.stdout.readline().strip()
    said = []
    while api and not (said and said[-1].startswith("serving")):  # printed before the address
        said.append(proc.stderr.readline().strip())
    assert api == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if not api else api
    return proc, api, said


def children(pid: int) -> list[int]:
    """The processes `pid` started: for a `step-gguf serve` or `run`, its llama-server (Linux)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024

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
    from step_gguf.runtime.build import STEP35_TEMPLATE, sdist_text
    from step_gguf.synth import synth

    if not folder.exists():
        synth(folder, "tiny", script=REASONING + CALL, chat_template=sdist_text(STEP35_TEMPLATE),
              rope_orig_ctx=1024)
    return folder


GREETING = ["Bonjour", " from", " the", " page", "."]


def greeting_checkpoint(folder: Path) -> Path:
    """A scripted checkpoint whose every answer is the plain text of GREETING (the template
    opens a reasoning block, which the script closes at once)."""
    from step_gguf.runtime.build import STEP35_TEMPLATE, sdist_text
    from step_gguf.synth import synth

    if not folder.exists():
        synth(folder, "tiny", script=["\n</think>\n", *GREETING], chat_template=sdist_text(STEP35_TEMPLATE),
              rope_orig_ctx=1024)
    return folder

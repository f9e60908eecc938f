"""The CLI as a user meets it: help that teaches, the demo flow, chat."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from step_gguf.cli import main


@pytest.mark.parametrize("command", [[], ["convert"], ["synth"], ["quantize"], ["runtime", "build"],
                                     ["plan"], ["run"], ["chat"], ["serve"], ["demo"]])
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_demo_runs_the_whole_flow(runtime):
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "synthesised tiny" in out and "converted to" in out and "loaded with the patched runtime" in out
    assert "tok/s" in out


def test_run_chats_with_a_gguf(runtime, gguf_file):
    result = CliRunner().invoke(main, ["run", str(gguf_file("tiny", "bf16")), "-p", "Hi", "-n", "4", "-c", "256"])
    assert result.exit_code == 0, result.output
    assert "4 generated at" in result.stderr and "tok/s" in result.stderr


def test_run_on_a_missing_file_says_so(runtime, tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 1
    assert "nope.gguf does not exist" in result.output and len(result.output.splitlines()) == 1

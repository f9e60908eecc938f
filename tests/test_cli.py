"""The CLI as a user meets it: help that teaches, the demo flow, chat."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from step_gguf.cli import main


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path, command", [((), main), *_commands(main)], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_every_command_explains_itself(path, command):
    """Every command's --help says what it does and what each of its options means."""
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert (command.help or "").strip(), f"{' '.join(path)} has no description"
    text = "".join(result.output.split())  # however click wraps it (at spaces and hyphens)
    assert "".join(command.help.split("\n\n")[0].split()) in text
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help"
            assert param.opts[0] in result.output


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


def test_a_long_build_shows_its_stages_and_compile_steps(capsys):
    """Off a terminal (CI, a log) a 15-minute build prints its stages and a line at every tenth
    of the compile steps, not one "compiling" line."""
    from step_gguf.cli.progress import StepProgress

    progress = StepProgress()
    progress.stage("configuring")
    progress.stage("compiling")
    for done in range(1, 236):
        progress.step(done, 235)
    progress.stage("packaging the llama_cpp wheel")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    steps = [line for line in lines if "compiled" in line]
    assert lines[0].startswith("configuring ...") and lines[-1].startswith("packaging")
    assert len(steps) == 11 and steps[-1].strip().startswith("compiled 235/235 steps")
    done = [int(line.split()[1].split("/")[0]) for line in steps]
    assert done == sorted(done) and done[0] == 1


def test_build_progress_follows_ninja_past_its_globbed_folder_recheck(capsys):
    """A Vulkan build's ninja first prints `[0/2] Re-checking globbed directories...` (and
    reaches 2/2), then counts the real build: its tenths are shown, not swallowed as done."""
    from step_gguf.cli.progress import StepProgress
    from step_gguf.native.build import _steps

    progress = StepProgress()
    on_line = _steps(progress.step)
    for line in ["[0/2] Re-checking globbed directories...", "[1/2] a", "[2/2] b",
                 *(f"[{i}/563] Building CXX object x{i}.o" for i in range(1, 564))]:
        on_line(line)
    progress.close()
    steps = [line for line in capsys.readouterr().err.splitlines() if "/563 steps" in line]
    assert len(steps) == 11 and steps[-1].strip().startswith("compiled 563/563 steps")


def test_run_without_ctx_takes_the_longest_context_and_says_so(runtime, gguf_file):
    from step_gguf.pipeline.source_facts import read_facts

    path = gguf_file("tiny", "bf16")
    result = CliRunner().invoke(main, ["run", str(path), "-p", "Hi", "-n", "2"])
    assert result.exit_code == 0, result.output
    # this machine holds the tiny model's whole context
    assert f"context: {read_facts(path).n_ctx_train} tokens" in result.stderr


def test_help_loads_neither_numpy_nor_gguf():
    """`step-gguf --help` and each command's help list their choices from light modules
    (step_gguf/core/choices.py, step_gguf/synth/presets.py): numpy and gguf alone took 0.12 s to import."""
    probe = ("import sys\nfrom step_gguf.cli import main\n"
             "for args in (['--help'], ['convert', '--help'], ['quantize', '--help'], ['synth', '--help']):\n"
             "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('numpy', 'gguf', 'torch', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]

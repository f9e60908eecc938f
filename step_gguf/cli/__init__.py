"""`step-gguf`: a thin click layer over the Python API; only this package prints. The group is
here, its commands in the modules beside it, by what they do."""

from __future__ import annotations

import logging

import click

from ..core.errors import StepGGUFError
from . import demo, files, measure, runtime, serving


class _Group(click.Group):
    """Turns StepGGUFError into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StepGGUFError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def main(verbose: bool) -> None:
    """Convert Step 3.5 Flash checkpoints to GGUF and run them on a patched llama.cpp.

    \b
    Typical flow:
      step-gguf runtime build                    # once: patched llama.cpp + llama-cpp-python
      step-gguf convert ./Step-3.5-Flash -o step35-bf16.gguf
      step-gguf demo                             # the whole flow on a tiny synthetic model
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


for command in (files.convert, files.quantize, files.recipes, files.synth, runtime.runtime,
                serving.plan, serving.run, serving.chat, serving.serve, serving.rpc_server,
                demo.demo, measure.imatrix, measure.eval_):
    main.add_command(command)

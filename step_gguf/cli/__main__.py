"""`python -m step_gguf.cli`, as the `step-gguf` script."""

from . import main

main()

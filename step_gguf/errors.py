"""Errors the CLI turns into one-line messages and a non-zero exit."""


class StepGGUFError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class CheckpointError(StepGGUFError):
    """The source checkpoint is missing, truncated, malformed or not Step 3.5."""


class TokenizerError(StepGGUFError):
    """The tokenizer cannot be mapped to a llama.cpp pre-tokenizer."""


class RuntimeMissingError(StepGGUFError):
    """The patched llama.cpp runtime is absent, unpatched or stale."""

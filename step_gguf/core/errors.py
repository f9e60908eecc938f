"""Errors the CLI turns into one-line messages and a non-zero exit."""

import contextlib
import struct


class StepGGUFError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class CheckpointError(StepGGUFError):
    """The source checkpoint is missing, truncated, malformed or not Step 3.5."""


class TokenizerError(StepGGUFError):
    """The tokenizer cannot be mapped to a llama.cpp pre-tokenizer."""


class RuntimeMissingError(StepGGUFError):
    """The patched llama.cpp runtime is absent, unpatched or stale."""


class SourceError(StepGGUFError):
    """A GGUF or other input file that cannot be read as what it should be."""


# what parsing untrusted bytes can raise when they are not shaped as expected
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError,
             OverflowError, UnicodeDecodeError, MemoryError, struct.error)


def describe(exc: BaseException) -> str:
    """One line saying what was wrong, for an exception from MALFORMED."""
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "missing field"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def malformed(path, error: type[StepGGUFError] = StepGGUFError, what: str = "is malformed"):
    """Turn any structural surprise while reading `path` into a one-line `error`."""
    try:
        yield
    except StepGGUFError:
        raise
    except MALFORMED as exc:
        raise error(f"{path} {what} ({describe(exc)})") from None

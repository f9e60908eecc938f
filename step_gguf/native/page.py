"""llama.cpp's chat page (the Svelte web UI in the sdist's tools/ui), built with npm from those
sources once into the cache, for the runtime build to embed in llama-server. llama.cpp's own
build would download a prebuilt copy; ours downloads nothing but npm packages."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..core.errors import StepGGUFError
from .process import run

log = logging.getLogger(__name__)

UI_DIR = Path("vendor/llama.cpp/tools/ui")  # in the sdist tree
NO_PAGE = ("the chat page needs node and npm when the runtime is built (apt-get install nodejs npm, "
           "then step-gguf runtime build); the API works without it")


def available() -> bool:
    """Whether this machine can build the page."""
    return shutil.which("npm") is not None


def chat_page(ui_src: Path, cache: Path, on_stage: Callable[[str], None] = lambda what: None) -> Path | None:
    """The built page (a folder with index.html) for the UI sources `ui_src`, made once under
    `cache`; None, with a warning saying how to get it, where npm is missing."""
    if (cache / "index.html").is_file():
        return cache
    npm = shutil.which("npm")
    if npm is None:
        log.warning(NO_PAGE)
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        work = Path(tmp) / "ui"
        shutil.copytree(ui_src, work)
        try:
            on_stage("installing the chat page's npm packages")
            run([npm, "ci", "--no-audit", "--no-fund", "--prefix", work], "installing the chat page's npm "
                "packages", env=os.environ | {"CI": "1"}, log_file=Path(tmp) / "npm-ci.log")
            on_stage("building the chat page")
            run([npm, "run", "build", "--prefix", work], "building the chat page",
                log_file=Path(tmp) / "npm-build.log")
        except StepGGUFError as exc:  # the runtime is still worth building without it
            log.warning("%s; %s", exc, NO_PAGE)
            return None
        if not (work / "dist" / "index.html").is_file():
            log.warning("npm built no %s; %s", work / "dist" / "index.html", NO_PAGE)
            return None
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(work / "dist", cache)
    return cache

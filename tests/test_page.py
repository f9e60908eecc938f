"""llama.cpp's chat page, built from the sdist's sources with npm into our llama-server: a real
browser (Debian's headless Chromium, driven by Playwright) opens the address `serve` prints,
types a message and gets the scripted model's answer on the page."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from scripted import GREETING, greeting_checkpoint, start_serve
from step_gguf.native import page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served_page(workdir, runtime):
    """`step-gguf serve` on the greeting model: (the chat page's address it printed, its stderr)."""
    from step_gguf.pipeline.convert import convert

    model = workdir / "greeting.gguf"
    if not model.exists():
        convert(greeting_checkpoint(workdir / "greeting"), model, outtype="bf16")
    proc, _, said = start_serve(model, "-c", "2048")
    yield next((line.removeprefix("chat page: ") for line in said if line.startswith("chat page: ")), None), said
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_serve_prints_the_page_beside_the_api(served_page):
    url, said = served_page
    assert url is not None and url.startswith("http://127.0.0.1:"), said


def test_a_message_typed_into_the_page_gets_the_models_answer(served_page, tmp_path):
    from playwright.sync_api import sync_playwright

    url, said = served_page
    assert CHROMIUM, "no chromium to drive: apt-get install chromium (ci/prerequisites.sh does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.goto(url)
            box = tab.get_by_role("textbox").first
            box.fill("Hello?")
            box.press("Enter")
            answer = tab.get_by_text("".join(GREETING))
            answer.wait_for(timeout=60_000)
            tab.screenshot(path=tmp_path / "page.png")
            assert answer.count() == 1
        finally:
            browser.close()


def _fake_npm(folder: Path, fail: bool = False) -> None:
    """An `npm` that "builds" dist/index.html under its --prefix, or fails."""
    script = folder / "npm"
    script.write_text("#!/bin/sh\n" + ("echo 'E network unreachable' >&2; exit 1\n" if fail else
                      'for a; do p=$prefix; prefix=$a; case $p in --prefix) dir=$a;; esac; done\n'
                      'case "$1" in run) mkdir -p "$dir/dist" && echo "<html>" > "$dir/dist/index.html";; esac\n'))
    script.chmod(0o755)


def test_the_page_is_built_once_and_a_failed_build_leaves_the_runtime_without_it(tmp_path, monkeypatch, caplog):
    ui = tmp_path / "ui"
    ui.mkdir()
    (ui / "package.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_npm(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache" / "0.3.36"
    assert page.available()
    assert page.chat_page(ui, cache) == cache and (cache / "index.html").is_file()
    _fake_npm(bin_dir, fail=True)  # built once: npm is not run again for the next build
    assert page.chat_page(ui, cache) == cache
    with caplog.at_level(logging.WARNING):
        assert page.chat_page(ui, tmp_path / "other") is None
    assert "network unreachable" in caplog.text and "apt-get install nodejs npm" in caplog.text
    assert not (tmp_path / "other").exists()

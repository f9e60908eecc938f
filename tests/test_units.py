"""Sizes on the command line: one reading for every option, llama.cpp's (K, M, G, T powers of
1000; KiB ... TiB powers of 1024; a plain number bytes)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from step_gguf.cli import main
from step_gguf.core.errors import StepGGUFError
from step_gguf.core.units import parse_size
from step_gguf.pipeline import quantize as q


@pytest.mark.parametrize("text, size", [("50G", 50 * 10**9), ("500M", 500 * 10**6), ("48GiB", 48 << 30),
                                        ("2 GB", 2 * 10**9), ("123456", 123456), ("1.5K", 1500),
                                        ("1TiB", 1 << 40), ("3mib", 3 << 20), ("7 B", 7)])
def test_sizes_read_as_llama_cpps_gguf_split_reads_them(text, size):
    assert parse_size(text, "--x") == size


@pytest.mark.parametrize("text", ["", "0", "50X", "-3G", "G", "1e9", "5 GiBs"])
def test_a_bad_size_names_its_option(text):
    with pytest.raises(StepGGUFError, match=r"^--split-max-size '.*' is not a size such as 100G"):
        parse_size(text, "--split-max-size")


def test_target_size_and_split_size_mean_the_same_bytes(checkpoint, tmp_path, monkeypatch):
    """The bug this parser replaced: --target-size 100G was 100 * 2^30 bytes and
    --split-max-size 100G 100 * 10^9, on one command line."""
    seen = {}

    def record(src, out, recipe, options, **callbacks):
        seen["options"] = options
        raise StepGGUFError("recorded")
    monkeypatch.setattr(q, "quantize", record)
    result = CliRunner().invoke(main, ["quantize", str(checkpoint("tiny")), "-o", str(tmp_path / "o.gguf"),
                                       "--target-size", "100G", "--split-max-size", "100G"])
    assert "recorded" in result.output, result.output
    assert seen["options"].target.bytes == seen["options"].split.max_bytes == 100 * 10**9

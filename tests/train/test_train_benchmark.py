"""`python -m benchmarks.train --smoke`: both implementations train the tiny shape on the CPU and the report
(table + JSON) carries tokens/s for each and the ratio."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_train_benchmark_smoke(tmp_path, capsys):
    from benchmarks.train import main

    out = tmp_path / "r.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ours tok/s" in printed and "tiny-64" in printed
    row = json.loads(out.read_text())["rows"][0]
    for impl in ("ours", "peer"):
        assert "error" not in row[impl], row[impl]
        assert row[impl]["tokens_per_s"] > 0 and row[impl]["loss"] > 0
    assert row["speedup"] > 0


def test_row_suffixes():
    from benchmarks.train import split_row

    assert split_row("1b-32k") == ("1b-32k", 0)
    assert split_row("1b-32k:gc") == ("1b-32k", 1)
    assert split_row("1b-32k:gc4") == ("1b-32k", 4)
    for bad in ("1b-32k:gc0", "1b-32k:gcx"):
        with pytest.raises(ValueError, match="the suffix is"):
            split_row(bad)

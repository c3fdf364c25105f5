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

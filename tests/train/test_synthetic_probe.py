"""`python -m benchmarks.synthetic_probe --quick`: the synthetic suite's throughput probe runs on the CPU, one
process and then two at once, and its JSON carries steps/s and tokens/s for each measurement."""

from __future__ import annotations

import json


def test_synthetic_probe_quick(tmp_path, capsys):
    from benchmarks.synthetic_probe import main

    out = tmp_path / "probe.json"
    assert main(["--quick", "--json", str(out)]) == 0
    assert "| mixer | T | tokens/step | processes |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {r["mixer"] for r in result["single"]} == {"kda", "gdn", "mla"}
    for row in result["single"] + result["concurrent"]:
        assert "error" not in row, row
        assert row["steps_per_s"] > 0 and row["tokens_per_s"] > 0
    assert [r["processes"] for r in result["concurrent"]] == [2]
    assert len(result["concurrent"][0]["steps_per_s_each"]) == 2

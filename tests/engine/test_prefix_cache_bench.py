"""benchmarks/prefix_cache.py runs end to end in its --smoke mode (tiny preset, CPU); the GPU run is the lead's."""

from __future__ import annotations

import json

import pytest
from helpers import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("prefix_cache")


def test_smoke(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    report = bench.main(["--smoke"])
    assert report["errors"] == []
    saved = json.loads((tmp_path / "prefix_cache.json").read_text())
    assert saved["ratios"] == json.loads(json.dumps(report["ratios"]))
    rows = {(r["mode"], r["context"]): r for r in report["ttft"]}
    assert set(rows) == {("on", 96), ("on", 160), ("off", 96), ("off", 160)}
    for C in (96, 160):
        on, off = rows[("on", C)], rows[("off", C)]
        assert on["prompt2"] == off["prompt2"] == C + 2 * 8 + 5
        # turn 2 finds everything turn 1 computed up to its last block boundary (prompt + answer - 1 tokens)
        assert on["cached2"] == (C + 8 + 5 - 1) // 16 * 16 and off["cached2"] == 0
        assert on["computed_tokens"] == on["prompt1"] + 4 + (on["prompt2"] - on["cached2"]) + 4
        assert off["computed_tokens"] == off["prompt1"] + 4 + off["prompt2"] + 4 and off["cached1"] == 0
        assert on["ttft2_s"] > 0 and off["ttft2_s"] > 0
    mt = {r["mode"]: r for r in report["multiturn"]}
    assert mt["on"]["prompt_tokens"] == mt["off"]["prompt_tokens"] and mt["on"]["generated_tokens"] == 3 * 2 * 5
    assert mt["on"]["computed_tokens"] < mt["off"]["computed_tokens"] and mt["off"]["cached_tokens"] == 0
    assert [q["context"] for q in report["ratios"]["ttft"]] == [96, 160] and report["ratios"]["multiturn"]


def test_bad_mode_is_a_clear_error(bench):
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.main(["--smoke", "--modes", "maybe"])


def test_merge_of_separate_runs(bench, tmp_path, capsys):
    row = {"context": 64, "prompt1": 70, "prompt2": 80, "cached2": 0, "computed_tokens": 80}
    on = {"ttft": [{**row, "mode": "on", "ttft2_s": 0.5, "ttft1_s": 2.0, "cached2": 64}],
          "multiturn": [{"mode": "on", "conversations": 2, "turns": 2, "wall_s": 1.0, "total_tok_per_s": 300.0,
                         "output_tok_per_s": 10.0, "computed_tokens": 50}], "errors": []}
    off = {"ttft": [{**row, "mode": "off", "ttft2_s": 2.0}],
           "multiturn": [{"mode": "off", "conversations": 2, "turns": 2, "wall_s": 2.0, "total_tok_per_s": 150.0,
                          "output_tok_per_s": 5.0, "computed_tokens": 90}], "errors": []}
    paths = []
    for name, rep in (("on", on), ("off", off)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    report = bench.main(["--merge", *paths, "--json", str(tmp_path / "all.json")])
    assert report["ratios"]["ttft"] == [{"context": 64, "off_over_on_ttft2": 4.0}]  # no turn 1 in off: no miss ratio
    assert report["ratios"]["multiturn"]["on_over_off_throughput"] == 2.0
    assert "second-turn TTFT off / on = 4.0x" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read"):
        bench.main(["--merge", str(tmp_path / "missing.json")])

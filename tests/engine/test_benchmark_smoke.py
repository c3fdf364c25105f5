"""benchmarks/engine_decode.py runs end to end on the CPU with the tiny preset (the GPU run is the lead's)."""

from __future__ import annotations

import json

import pytest
from helpers import import_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks.engine_decode, imported as `python -m benchmarks.engine_decode` does (from the repo root)."""
    return import_benchmark("engine_decode")


def test_parse_count(bench):
    assert [bench.parse_count(c) for c in ("4K", "128k", "1M", "300")] == [4096, 131072, 1048576, 300]


def test_variant_config_makes_every_layer_mla(bench):
    from kimi_linear.config import ModelConfig
    from kimi_linear.tools.presets import preset_config

    base = preset_config("48b-a3b-e64")
    mla = ModelConfig.from_dict(bench.variant_config(base, "mla"))
    hyb = ModelConfig.from_dict(bench.variant_config(base, "hybrid"))
    assert mla.layer_types == ("mla",) * 27 and hyb.layer_types.count("mla") == 7
    assert mla.mlp_types == hyb.mlp_types and mla.num_experts == 64


def test_cpu_smoke(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    report = bench.main(["--preset", "tiny", "--contexts", "40,100", "--steps", "2", "--warmup", "1",
                         "--device", "cpu", "--dtype", "float32", "--block-size", "16"])
    saved = json.loads((tmp_path / "engine_decode.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    rows = {(r["variant"], r["context"]): r for r in report["results"]}
    assert set(rows) == {("hybrid", 40), ("hybrid", 100), ("mla", 40), ("mla", 100)}
    for r in rows.values():
        # both scheduling modes, one after the other on the same request: 2 x (warmup + steps)
        assert r["tpot_ms"] > 0 and r["floor_ms"] > 0 and r["generated"] == 6
        assert set(r["modes"]) == {"sync", "async"} and r["tpot_ms"] == r["modes"]["async"]["tpot_ms"]
    # the latent bytes grow with the context and with the number of MLA layers (tiny: 1 of 4 vs 4 of 4)
    assert rows[("mla", 100)]["bytes"]["latent"] == 4 * rows[("hybrid", 100)]["bytes"]["latent"]
    assert rows[("hybrid", 100)]["bytes"]["latent"] > rows[("hybrid", 40)]["bytes"]["latent"]
    assert rows[("mla", 40)]["bytes"]["kda_state"] == 0 < rows[("hybrid", 40)]["bytes"]["kda_state"]
    assert [q["context"] for q in report["ratios"]] == [40, 100]


def test_long_context_throughput_cpu_smoke(tmp_path, monkeypatch):
    """benchmarks/long_context_throughput.py: the batch is the most requests the pools hold (tiny on the CPU:
    blocks for min(max_model_len * max_num_seqs, 2^18) tokens), every request decodes, the pools are empty after."""
    lct = import_benchmark("long_context_throughput")
    monkeypatch.setenv("OUT", str(tmp_path))
    report = lct.main(["--preset", "tiny", "--contexts", "200", "--steps", "2", "--warmup", "1", "--device", "cpu",
                       "--dtype", "float32", "--block-size", "16", "--max-batch", "4"])
    rows = {r["variant"]: r for r in report["rows"]}
    # the CPU's default cache holds max_num_seqs requests of max_model_len: the --max-batch cap binds
    assert rows["hybrid"]["batch"] == rows["mla"]["batch"] == 4
    for r in rows.values():
        assert abs(r["tokens_per_s"] - r["batch"] / r["step_ms"] * 1e3) < 1e-6 and r["per_token_ms"] > 0
    assert report["ratios"][0]["context"] == 200
    assert json.loads((tmp_path / "long_context_throughput.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_long_context_largest_batch_is_bound_by_blocks_slots_and_cap(monkeypatch):
    from types import SimpleNamespace as NS

    lct = import_benchmark("long_context_throughput")

    def engine(free_blocks, free_slots, mla_layers=(3,)):
        return NS(scheduler=NS(block_pool=NS(block_size=64, num_free=free_blocks), state_pool=NS(num_free=free_slots)),
                  runner=NS(model=NS(config=NS(mla_layers=mla_layers))))

    per_req = -(-(1 << 20) // 64) + 1  # 1M tokens + 22 steps: 16,385 blocks
    assert lct.largest_batch(engine(5 * per_req + 7, 256), 1 << 20, 22, 256) == 5  # blocks
    assert lct.largest_batch(engine(50 * per_req, 3), 1 << 20, 22, 256) == 3  # KDA state slots
    assert lct.largest_batch(engine(50 * per_req, 256), 1 << 20, 22, 8) == 8  # the cap
    assert lct.largest_batch(engine(per_req - 1, 256), 1 << 20, 22, 8) == 0  # not one

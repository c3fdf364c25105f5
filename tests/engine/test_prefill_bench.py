"""benchmarks/prefill.py runs end to end on the CPU with the tiny preset (the GPU run is the lead's)."""

from __future__ import annotations

import json

import pytest
from helpers import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("prefill")


def test_cpu_smoke(bench, tmp_path, monkeypatch, capsys):
    """Two contexts chunked by a 192-token budget (2 and 3 steps); FLOPs by metrics.forward_flops with the
    lm_head once; no peak on the CPU (MFU '-'), a measured matmul rate (the other ratio is a number)."""
    from kimi_linear.config import ModelConfig
    from kimi_linear.tools.presets import preset_config
    from kimi_linear.train.metrics import forward_flops

    monkeypatch.setenv("OUT", str(tmp_path))
    report = bench.main(["--preset", "tiny", "--contexts", "256,512", "--device", "cpu", "--dtype", "float32",
                         "--max-num-batched-tokens", "192", "--block-size", "16"])
    assert report["errors"] == [] and report["peak_tflops"] is None and report["matmul_tflops"] > 0
    config = ModelConfig.from_dict(preset_config("tiny"))
    rows = {r["context"]: r for r in report["rows"]}
    assert set(rows) == {256, 512}
    for N, chunks in ((256, 2), (512, 3)):
        r = rows[N]
        assert r["chunk"] == 192 and r["chunks"] == chunks and len(r["chunk_ms"]) == chunks
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(N / r["seconds"])
        assert r["flops"]["total"] == pytest.approx(forward_flops(config, N, num_logit_tokens=1))
        assert r["tflops"] == pytest.approx(r["flops"]["total"] / r["seconds"] / 1e12)
        assert r["mfu_peak"] is None and r["mfu_matmul"] == pytest.approx(r["tflops"] / report["matmul_tflops"])
    saved = json.loads((tmp_path / "prefill.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    table = capsys.readouterr().out.split("MFU/matmul\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["256", "192", "2"] and table[0].split()[-2] == "-"

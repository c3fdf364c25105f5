"""Static sm_90 checks without a GPU (benchmarks/sm90_compile.py): the MLA decode kernel over an fp8 latent
cache keeps its tiles on Triton's pipelined async copies with the default launch (dual_load), where a single
load feeding both dots through the upcast is copied synchronously (1.15x slower at 1M on the H200)."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import sm90_compile
from kimi_linear.ops.mla.decode import _default_config

pytestmark = pytest.mark.skipif(not sm90_compile.available(), reason="this Triton cannot compile for sm_90 here")


def test_fp8_cache_default_launch_keeps_async_copies():
    assert _default_config(32, torch.bfloat16, torch.float8_e4m3fn)["dual_load"]
    assert not _default_config(32, torch.bfloat16, torch.bfloat16)["dual_load"]
    r = sm90_compile.report()
    bf16, one, dual = r["bf16"], r["fp8e4nv"], r["fp8e4nv/dl"]
    assert bf16["async_copies"] >= 4  # the latent and rope tiles, double-buffered
    assert one["async_copies"] < bf16["async_copies"]  # the latent tile fell off the async path
    assert dual["async_copies"] >= bf16["async_copies"] + 2  # both latent loads and the rope tile are async
    assert "2" in dual["mma"]


def test_compile_report_refuses_interpreted_kernels():
    from kimi_linear.ops.mla.decode import _mla_decode_split_kernel

    if not hasattr(_mla_decode_split_kernel, "arg_names") or type(_mla_decode_split_kernel).__name__ != "JITFunction":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            sm90_compile.compile_report(_mla_decode_split_kernel, {}, {})
    else:
        with pytest.raises(ValueError, match="no type or value"):
            sm90_compile.compile_report(_mla_decode_split_kernel, {}, {})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="capture records interpreted launches")
def test_captured_launches_compile(tmp_path):
    """`capture` records the launches of an op run under the interpreter (here: MLA decode at a tiny shape,
    the split and the reduction kernels with their launch options); the --records child compiles them."""
    import json
    import subprocess
    import sys

    from kimi_linear.ops.mla.decode import mla_decode

    q = torch.randn(1, 4, 48)
    cache = torch.randn(4, 16, 48)
    tables = torch.tensor([[2, 0, 1, 3]], dtype=torch.int32)
    w = torch.randn(4 * 48, 32)
    lens = torch.tensor([40], dtype=torch.int32)
    recs = sm90_compile.capture(lambda: mla_decode(q, cache, tables, lens, w, 16, 0.1, num_splits=2))
    names = sorted(r["name"] for r in recs)
    assert names == ["_mla_decode_reduce_kernel", "_mla_decode_split_kernel"]
    split = next(r for r in recs if r["name"] == "_mla_decode_split_kernel")
    assert split["options"]["num_warps"] == 4 and split["args"]["cache"] == {"ptr": "fp32"}
    path, out = tmp_path / "recs.json", tmp_path / "out.json"
    path.write_text(json.dumps(recs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-m", "benchmarks.sm90_compile", "--records", str(path), "--json", str(out)],
                   cwd=root, env=env, check=True, capture_output=True, timeout=300)
    reports = {r["name"]: r["report"] for r in json.loads(out.read_text())}
    assert set(reports) == set(names) and all(0 < r["regs"] <= 255 for r in reports.values())

"""Two gloo processes with FSDP2 (torchrun, CPU) give the losses of one process with the same global batch.

Both runs: the tiny preset, 2 rows of 32 tokens per step (one per rank under torchrun), fp32, Muon (its
2-D matrices gathered and orthogonalised across the shards, its expert stacks locally) and AdamW for the rest.
Tolerance: 1e-4 relative on each step's loss and grad norm. The first step agrees to ~1e-7; later steps drift by
~1e-5 because the gradients' reduction order differs and Muon's bf16 Newton-Schulz iteration amplifies that.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kimi_linear.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--preset", "tiny", "--seq-len", "32", "--batch-tokens", "64", "--steps", "3", "--lr", "3e-3",
         "--warmup-steps", "1", "--optimizer", "muon", "--dtype", "float32", "--device", "cpu"]


def run(prefix: list[str], out, data, tokenizer=None) -> list[dict]:
    extra = ["--tokenizer", tokenizer] if tokenizer else []
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *prefix, "-m", "kimi_linear.train", *FLAGS, "--data", data, "--out", str(out),
                        *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return [r for r in read_metrics(str(out)) if "loss" in r]


def test_fsdp2_two_processes_equal_one(tmp_path, text_data):
    one = run([], tmp_path / "one", text_data)
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tmp_path / "two", text_data,
              tokenizer=str(tmp_path / "one" / "tokenizer"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss_tokens"] == a["loss_tokens"] and b["tokens"] == a["tokens"] == 64
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    # the sharded run exports one full HF folder
    assert os.path.isfile(tmp_path / "two" / "hf" / "final" / "model.safetensors.index.json")

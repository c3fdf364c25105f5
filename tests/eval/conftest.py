"""Fixtures of the lm-eval tests: no network (datasets and the hub offline, a private datasets cache), the
repository root as working directory (the task YAMLs name their jsonl files from there), a loopback server
over the tiny model, and the reference log-likelihood computed by the model itself."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="kimi-linear-datasets-"))

import pytest  # noqa: E402

pytest.importorskip("lm_eval", reason='needs the [eval] extra: pip install -e ".[eval]"')

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "server"))

from loopback import RunningServer  # noqa: E402


@pytest.fixture(scope="module")
def at_root():
    old = os.getcwd()
    os.chdir(ROOT)
    yield ROOT
    os.chdir(old)


@pytest.fixture(scope="module")
def eval_server(tiny_checkpoint):
    srv = RunningServer(str(tiny_checkpoint))
    srv.wait_healthy()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """score(context_ids, continuation_ids) -> (sum of the continuation's log-probs, all greedy), from one
    plain forward pass of the checkpoint's model (no engine, no cache)."""
    import torch

    from kimi_linear import KimiLinearForCausalLM

    model = KimiLinearForCausalLM.from_pretrained(str(tiny_checkpoint), progress=False)

    def score(context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = context + continuation
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
        rows = range(len(context) - 1, len(ids) - 1)
        total = sum(logp[r, ids[r + 1]].item() for r in rows)
        greedy = all(int(logp[r].argmax()) == ids[r + 1] for r in rows)
        return total, greedy

    return score


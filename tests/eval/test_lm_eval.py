"""lm-eval 0.4 on three local tasks (multiple choice, generation, rolling perplexity; tests/eval/tasks), both
ways the README shows: `local-completions` with `tokenizer_backend=remote` against a loopback server, and the
offline `kimi_linear` model class. The metrics must be there, and every log-likelihood must equal what one
plain forward pass of the model gives for the same tokens (so the numbers are right, not just present)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from loopback import API_KEY  # tests/server, put on sys.path by this folder's conftest

TASKS = str(Path(__file__).resolve().parent / "tasks")

TASK_NAMES = ["kimi_tiny_mc", "kimi_tiny_gen", "kimi_tiny_rolling"]
METRICS = {"kimi_tiny_mc": ["acc,none", "acc_norm,none"], "kimi_tiny_gen": ["exact_match,none"],
           "kimi_tiny_rolling": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"]}


def _evaluate(model, model_args=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASK_NAMES, log_samples=True,
                                   task_manager=TaskManager(include_path=TASKS, include_defaults=False),
                                   verbosity="WARNING")


@pytest.fixture(scope="module")
def offline(at_root, tiny_checkpoint):
    from kimi_linear.eval.lm_eval_model import KimiLinearLM

    lm = KimiLinearLM(str(tiny_checkpoint), device="cpu", max_model_len=256, max_num_batched_tokens=256)
    return lm, _evaluate(lm)


@pytest.fixture(scope="module")
def remote(at_root, eval_server):
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token; the remote tokenizer
    # sends auth_token to /tokenize, which needs the key too
    try:
        yield _evaluate("local-completions", f"model=tiny,base_url={eval_server.url}/v1/completions,"
                                             f"tokenizer_backend=remote,auth_token={API_KEY},max_length=256,max_retries=1")
    finally:
        mp.undo()


def _check_metrics(results):
    for task, names in METRICS.items():
        for name in names:
            v = results["results"][task][name]
            assert isinstance(v, float) and math.isfinite(v), (task, name, v)
        assert results["results"][task]["sample_len"] == len(results["samples"][task])


def _check_loglikelihoods(results, lm, reference):
    """Every scored (context, continuation) equals the model's own log-likelihood of the same tokens."""
    checked = 0
    for s in results["samples"]["kimi_tiny_mc"]:
        for (context, continuation), (ll, greedy) in zip(s["arguments"], s["filtered_resps"]):
            ref_ll, ref_greedy = reference(*lm._encode_pair(context, continuation))
            assert ll == pytest.approx(ref_ll, abs=2e-3) and greedy == ref_greedy
            checked += 1
    for s in results["samples"]["kimi_tiny_rolling"]:
        ids = lm.tok_encode(s["arguments"][0][0])
        assert len(ids) < 255  # one rolling window: the prefix token, then the whole text
        ref_ll, _ = reference([lm.prefix_token_id], ids)
        assert s["filtered_resps"][0] == pytest.approx(ref_ll, abs=2e-3)
        checked += 1
    assert checked == 8 + 2


def test_kimi_linear_model_class(offline, reference):
    lm, results = offline
    _check_metrics(results)
    _check_loglikelihoods(results, lm, reference)
    mc = results["samples"]["kimi_tiny_mc"]
    assert [s["acc"] for s in mc] == [float(max(range(len(s["filtered_resps"])),
                                                key=lambda i: s["filtered_resps"][i][0]) == s["target"]) for s in mc]


def test_local_completions_with_remote_tokenizer(remote, offline, reference):
    lm, off = offline
    _check_metrics(remote)
    _check_loglikelihoods(remote, lm, reference)
    # greedy generations through the server equal the offline class's (same tokens, same stop strings)
    got = [s["filtered_resps"][0] for s in remote["samples"]["kimi_tiny_gen"]]
    want = [s["filtered_resps"][0] for s in off["samples"]["kimi_tiny_gen"]]
    assert got == want and all(isinstance(t, str) and t for t in got)
    assert remote["results"]["kimi_tiny_mc"]["acc,none"] == off["results"]["kimi_tiny_mc"]["acc,none"]


def test_cli_module_registers_the_model(at_root, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`python -m kimi_linear.eval --model kimi_linear ...` (lm-eval's CLI with our model registered)."""
    from kimi_linear.eval.__main__ import main

    monkeypatch.setattr(sys, "argv", [
        "kimi_linear.eval", "--model", "kimi_linear", "--model_args",
        f"pretrained={tiny_checkpoint},max_model_len=128", "--device", "cpu", "--tasks", "kimi_tiny_mc",
        "--include_path", TASKS, "--limit", "1", "--output_path", str(tmp_path / "out")])
    main()
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    res = json.loads(written[0].read_text())["results"]["kimi_tiny_mc"]
    assert res["acc,none"] in (0.0, 1.0) and res["sample_len"] == 1

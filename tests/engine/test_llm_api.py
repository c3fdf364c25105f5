"""The offline API on the tiny model (CPU): prompt validation, text prompts, n > 1, seeds, logprobs, eos
(config + generation_config, ignore_eos), stop_token_ids, max_tokens=None, abort, streaming, the
output-processor seam, engine options."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams
from kimi_linear.engine.outputs import SequenceProcessor
from kimi_linear.errors import ConfigError, ValidationError

KW = dict(device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=8)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), **KW)


def greedy(max_tokens=6, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def ids(*tokens):
    return {"prompt_token_ids": list(tokens)}


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("prompt,params,param,match", [
    (ids(), greedy(), "prompt", "empty"),
    (ids(1, 2, 1024), greedy(), "prompt_token_ids", r"prompt_token_ids\[2\] = 1024 is out of the vocabulary"),
    (ids(1, -1), greedy(), "prompt_token_ids", "out of the vocabulary"),
    ({"prompt_token_ids": [1, "a"]}, greedy(), "prompt_token_ids", "list of integers"),
    (ids(*range(1, 61)), greedy(max_tokens=5), "max_tokens", r"plus max_tokens \(5\) exceeds max_model_len \(64\)"),
    (ids(*range(1, 65)), greedy(), "prompt", "leaves no room"),
    (3.5, greedy(), "prompt", "string or a dict"),
    ({"tokens": [1]}, greedy(), "prompt", "prompt_token_ids"),
    (ids(1, 2), SamplingParams(logit_bias={5000: 1.0}), "logit_bias", "out of the vocabulary"),
])
def test_invalid_prompts_raise_named_errors_and_queue_nothing(llm, prompt, params, param, match):
    with pytest.raises(ValidationError, match=match) as e:
        llm.generate([ids(1, 2, 3), prompt], params, use_tqdm=False)  # the valid first prompt is not queued
    assert e.value.param == param
    assert not llm.llm_engine.has_unfinished_requests()
    assert_pools_empty(llm)


def test_bad_argument_shapes(llm):
    with pytest.raises(ValidationError, match="2 sampling_params for 1 prompts") as e:
        llm.generate([ids(1)], [greedy(), greedy()], use_tqdm=False)
    assert e.value.param == "sampling_params"
    with pytest.raises(ValidationError, match="prompt_token_ids"):
        llm.generate([1, 2, 3], greedy(), use_tqdm=False)
    with pytest.raises(ValidationError, match="must be a SamplingParams"):
        llm.generate([ids(1)], {"temperature": 0}, use_tqdm=False)


def test_unknown_engine_option_and_bad_values(tiny_checkpoint):
    with pytest.raises(ConfigError, match="unknown engine option") as e:
        LLM(str(tiny_checkpoint), device="cpu", max_num_sequences=4)
    assert e.value.key == "max_num_sequences"
    with pytest.raises(ConfigError) as e:
        LLM(str(tiny_checkpoint), device="cpu", gpu_memory_utilization=1.5)
    assert e.value.key == "gpu_memory_utilization"
    with pytest.raises(ConfigError) as e:
        LLM(str(tiny_checkpoint), device="cpu", load_format="pickle")
    assert e.value.key == "load_format"
    with pytest.raises(ConfigError) as e:
        LLM(str(tiny_checkpoint), device="cpu", max_model_len=200, block_size=8, num_gpu_blocks_override=10)
    assert e.value.key == "max_model_len"


# ---------------------------------------------------------------- text, n, seeds, logprobs
def test_text_prompt_uses_the_tokenizer(llm):
    tok = llm.get_tokenizer()
    assert tok is not None
    out = llm.generate("hello world", greedy(), use_tqdm=False)[0]
    assert out.prompt == "hello world" and out.prompt_token_ids == tok.encode("hello world")
    c = out.outputs[0]
    assert len(c.token_ids) == 6 and c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    same = llm.generate(ids(*out.prompt_token_ids), greedy(), use_tqdm=False)[0]
    assert same.outputs[0].token_ids == c.token_ids


def test_text_prompt_without_tokenizer_is_a_clear_error(tiny_checkpoint, tmp_path):
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        shutil.copy(tiny_checkpoint / f, tmp_path / f)
    for f in tiny_checkpoint.glob("*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    llm = LLM(str(tmp_path), **KW)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValidationError, match="need a tokenizer") as e:
        llm.generate("hello", greedy(), use_tqdm=False)
    assert e.value.param == "prompt"
    out = llm.generate(ids(5, 6, 7), greedy(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].text == ""


def test_n_sequences_and_seeds(llm):
    p = ids(3, 1, 4, 1, 5, 9, 2, 6)
    sp = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    a = llm.generate(p, sp, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in a.outputs)
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # each sequence draws its own tokens
    # the same seed gives the same sequences, alone or in a crowd of unseeded requests
    crowd = llm.generate([ids(7, 7, 7), p, ids(8, 9)],
                         [SamplingParams(temperature=1.0, max_tokens=5), sp, SamplingParams(temperature=1.0)],
                         use_tqdm=False)
    assert [c.token_ids for c in crowd[1].outputs] == [c.token_ids for c in a.outputs]
    g = llm.generate(p, SamplingParams(n=2, temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert g.outputs[0].token_ids == g.outputs[1].token_ids
    assert_pools_empty(llm)


def test_logprobs_are_the_models_raw_logprobs(llm):
    prompt = [11, 22, 33, 44, 55]
    out = llm.generate(ids(*prompt), greedy(max_tokens=4, logprobs=3), use_tqdm=False)[0].outputs[0]
    model = llm.llm_engine.runner.model
    with torch.no_grad():
        full = torch.tensor([prompt + out.token_ids])
        ref = torch.log_softmax(model(full)[0].float(), -1)[len(prompt) - 1:-1]  # predicting each output token
    assert len(out.logprobs) == 4
    total = 0.0
    for t, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in entry and entry[tok].rank == 1  # greedy: the top token
        assert len(entry) == 3
        top = ref[t].topk(3)
        assert list(entry) == top.indices.tolist()
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[t, tid].item()) < 1e-4
            assert lp.decoded_token == llm.get_tokenizer().decode([tid])
        total += entry[tok].logprob
    assert abs(out.cumulative_logprob - total) < 1e-5
    zero = llm.generate(ids(*prompt), greedy(max_tokens=2, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert all(list(e) == [t] for e, t in zip(zero.logprobs, zero.token_ids))
    none = llm.generate(ids(*prompt), greedy(max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None  # as vLLM: only with logprobs requested


# ---------------------------------------------------------------- stopping
def test_max_tokens_none_runs_to_the_context_limit(llm):
    out = llm.generate(ids(*range(1, 61)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_stop_token_ids(llm):
    first = llm.generate(ids(4, 5, 6), greedy(max_tokens=5), use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate(ids(4, 5, 6), greedy(max_tokens=5, stop_token_ids=[first[1]]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first[:2] and out.finish_reason == "stop" and out.stop_reason == first[1]


def test_eos_is_the_union_with_generation_config(tiny_checkpoint, tmp_path, llm):
    first = llm.generate(ids(4, 5, 6), greedy(max_tokens=5), use_tqdm=False)[0].outputs[0].token_ids
    for f in tiny_checkpoint.iterdir():
        shutil.copy(f, tmp_path / f.name)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen.update(eos_token_id=[first[2], 77], temperature=0.25, top_p=0.5, max_new_tokens=9)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    eng = LLM(str(tmp_path), **KW)
    assert eng.llm_engine.eos_token_ids >= {770, first[2], 77}  # config.json's eos plus the list
    out = eng.generate(ids(4, 5, 6), greedy(max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop" and out.stop_reason is None
    out = eng.generate(ids(4, 5, 6), greedy(max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first and out.finish_reason == "length"
    d = eng.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.max_tokens) == (0.25, 0.5, 9)


# ---------------------------------------------------------------- engine-level behaviour
def test_abort_and_streaming(llm):
    eng = llm.llm_engine
    eng.add_request("keep", ids(1, 2, 3), greedy(max_tokens=6), stream=True)
    eng.add_request("drop", ids(4, 5, 6, 7), SamplingParams(n=2, temperature=0, max_tokens=20))
    first = eng.step()
    assert [o.request_id for o in first] == ["keep"] and not first[0].finished
    assert len(first[0].outputs[0].token_ids) == 1
    eng.step()
    eng.abort_request("drop")
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    drop = outs["drop"][-1]
    assert drop.finished and [c.finish_reason for c in drop.outputs] == ["abort", "abort"]
    assert len(drop.outputs[0].token_ids) == 2
    keep = outs["keep"]
    assert keep[-1].finished and len(keep[-1].outputs[0].token_ids) == 6
    assert [len(o.outputs[0].token_ids) for o in keep] == list(range(7 - len(keep), 7))
    assert_pools_empty(llm)


class StopOnToken(SequenceProcessor):
    """A processor that ends its sequence when `target` appears (the seam stop strings plug into)."""

    target = None

    def on_token(self, token_id, sample):
        super().on_token(token_id, sample)
        return f"saw {token_id}" if token_id == self.target else None


def test_output_processor_seam(llm):
    eng = llm.llm_engine
    first = llm.generate(ids(9, 8, 7), greedy(max_tokens=5), use_tqdm=False)[0].outputs[0].token_ids
    StopOnToken.target = first[1]
    old = eng.processor_factory
    eng.processor_factory = StopOnToken
    try:
        out = llm.generate(ids(9, 8, 7), greedy(max_tokens=5), use_tqdm=False)[0].outputs[0]
    finally:
        eng.processor_factory = old
    assert out.token_ids == first[:2] and out.finish_reason == "stop" and out.stop_reason == f"saw {first[1]}"
    assert_pools_empty(llm)

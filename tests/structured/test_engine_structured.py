"""Structured output through the engine (tiny random model, CPU): JSON-schema output from LLM.chat parses
and validates (greedy, and sampled n = 2 under cache pressure: preemption keeps each matcher's state),
json_object, choice and regex; an invalid constraint is a ValidationError for that request only, before
anything is queued; compiled grammars are cached; a terminated grammar finishes the sequence."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kimi_linear import LLM, SamplingParams
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import StructuredOutputsParams as SO
from kimi_linear.tools.create import create_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
EOS = {769, 770}
KW = dict(device="cpu", dtype="float32", max_model_len=112, max_num_seqs=3, max_num_batched_tokens=24, block_size=8,
          num_gpu_blocks_override=16)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), **KW)


def assert_idle(llm):
    s = llm.llm_engine.scheduler
    assert not s.running and not s.waiting and s.block_pool.num_used == 0 and s.state_pool.num_used == 0


def test_json_schema_from_chat_parses_and_validates(llm):
    conv = [{"role": "user", "content": "Describe a user as JSON."}]
    so = SO(json=SCHEMA)
    before = llm.llm_engine.scheduler.stats.num_preemptions
    outs = llm.chat([conv, [{"role": "user", "content": "Another user, as JSON please."}]],
                    [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so),
                     SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=11, max_tokens=80, structured_outputs=so)],
                    use_tqdm=False)
    assert llm.llm_engine.scheduler.stats.num_preemptions > before  # matchers survived recompute
    completions = [c for o in outs for c in o.outputs]
    assert len(completions) == 3
    for c in completions:
        assert c.finish_reason == "stop" and c.stop_reason is None and c.token_ids[-1] in EOS, c
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert completions[1].token_ids != completions[2].token_ids  # each sequence has its own matcher
    assert_idle(llm)


def test_json_object_choice_and_regex(llm):
    prompts = ["Say yes or no:", "Code:", "A JSON object:"]
    choices = ["yes", "no", "maybe so"]
    quote = llm.get_tokenizer().encode('"')[0]  # a random model writes endless strings: a bias closes them sooner
    outs = llm.generate(prompts, [
        SamplingParams(temperature=1.0, seed=4, max_tokens=12, structured_outputs=SO(choice=choices)),
        SamplingParams(temperature=1.0, seed=5, max_tokens=20, structured_outputs=SO(regex=r"[a-z]{2,4}-\d{3}")),
        SamplingParams(temperature=0, max_tokens=60, logit_bias={quote: 8.0}, structured_outputs=SO(json_object=True)),
    ], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert texts[0] in choices
    assert re.fullmatch(r"[a-z]{2,4}-\d{3}", texts[1]), texts[1]
    assert outs[2].outputs[0].finish_reason == "stop" and isinstance(json.loads(texts[2]), dict)
    assert_idle(llm)


def test_terminated_grammar_finishes_even_with_ignore_eos(llm):
    out = llm.generate("Pick:", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                               structured_outputs=SO(choice=["alpha", "beta"])),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop" and out.token_ids[-1] in EOS


def test_constraints_that_exclude_every_token_abort_the_sequence(llm):
    tok = llm.get_tokenizer()
    banned = tok.encode("zz")[0]
    out = llm.generate("Pick:", SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[banned],
                                               structured_outputs=SO(choice=["yes"])), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) == 1
    assert_idle(llm)


def test_invalid_constraints_fail_alone_before_queueing(llm):
    bad = SO(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    good = SamplingParams(temperature=0, max_tokens=4)
    for sp, param in [(SamplingParams(structured_outputs=bad), "structured_outputs"),
                      (SamplingParams(structured_outputs=SO(json="{not json")), "structured_outputs"),
                      (SamplingParams(structured_outputs=SO(grammar="root ::= ")), "structured_outputs"),
                      (SamplingParams(structured_outputs=SO(regex="[a-")), "structured_outputs"),
                      (SamplingParams(min_tokens=2, structured_outputs=SO(json_object=True)), "min_tokens")]:
        with pytest.raises(ValidationError) as e:
            llm.generate(["fine", "broken"], [good, sp], use_tqdm=False)
        assert e.value.param == param, e.value
        assert not llm.llm_engine.has_unfinished_requests()
    # the engine still serves structured requests afterwards
    ok = llm.generate("x", SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=["a", "b"])),
                      use_tqdm=False)[0].outputs[0]
    assert ok.text in ("a", "b")


def test_compiled_grammars_are_cached_by_spec(llm):
    eng = llm.llm_engine
    a = eng.process_inputs("x", SamplingParams(structured_outputs=SO(json={"type": "object", "required": ["k"]})))
    b = eng.process_inputs("y", SamplingParams(structured_outputs=SO(json={"required": ["k"], "type": "object"})))
    c = eng.process_inputs("y", SamplingParams(structured_outputs=SO(json={"type": "object"})))
    assert a.grammar is b.grammar and c.grammar is not a.grammar
    assert eng.process_inputs("x", SamplingParams()).grammar is None


def test_structured_output_needs_a_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "tiny", progress=False, tokenizer=False)
    bare = LLM(str(tmp_path), **KW)
    with pytest.raises(ValidationError, match="need a tokenizer") as e:
        bare.generate({"prompt_token_ids": [1, 2]}, SamplingParams(structured_outputs=SO(json_object=True)),
                      use_tqdm=False)
    assert e.value.param == "structured_outputs"

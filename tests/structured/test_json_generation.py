"""JSON-schema constrained decoding from the tiny random model: the output parses and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.engine.sampler import Sampler, SamplingBatch, make_generator
from kimi_linear.loader.chat_template import render_chat
from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.models.sequence_cache import SequenceCache
from kimi_linear.sampling_params import SamplingParams, StructuredOutputsParams
from kimi_linear.structured import make_backend

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False).eval()
    tok = load_tokenizer(tiny_checkpoint)
    return model, tok


def generate(model, tok, params: SamplingParams, max_new: int = 120) -> tuple[str, bool]:
    eos = [770, 769]
    backend = make_backend(tok, model.config.vocab_size, eos, any_whitespace=False)
    matcher = backend.matcher(backend.compile(params.structured_outputs.kind(), params.structured_outputs.spec()))
    prompt = tok.encode(render_chat([{"role": "user", "content": "Describe a user as JSON."}]))
    cache = SequenceCache(model.config, batch_size=1, dtype=torch.float32)
    gen = make_generator(params.seed, "cpu") if params.seed is not None else None
    bitmask = torch.full((1, (backend.vocab_size + 31) // 32), -1, dtype=torch.int32)  # all allowed
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache)[:, -1]
        for _ in range(max_new):
            matcher.fill_bitmask(bitmask, 0)
            batch = SamplingBatch.build([params], [gen], model.config.vocab_size, "cpu", bitmask=bitmask,
                                        prompt_token_ids=[prompt], output_token_ids=[out], eos_token_ids=eos)
            t = Sampler()(logits, batch).token_ids[0].item()
            assert matcher.accept(t), f"sampled token {t} rejected by the grammar"
            if t in eos:
                return tok.decode(out), matcher.is_terminated()
            out.append(t)
            logits = model(torch.tensor([[t]]), cache)[:, -1]
    return tok.decode(out), False


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=3,
                                                                 repetition_penalty=1.2)],
                         ids=["greedy", "sampled_top_p_penalty"])
def test_schema_output_parses_and_validates(setup, kw):
    model, tok = setup
    params = SamplingParams(max_tokens=None, structured_outputs=StructuredOutputsParams(json=SCHEMA), **kw)
    text, terminated = generate(model, tok, params)
    assert terminated, f"no end within the token budget: {text!r}"
    obj = json.loads(text)
    jsonschema.validate(obj, SCHEMA)


def test_unconstrained_random_model_is_not_json(setup):
    """The constraint does the work: without it the same model does not produce the JSON."""
    model, tok = setup
    prompt = tok.encode(render_chat([{"role": "user", "content": "Describe a user as JSON."}]))
    with torch.no_grad():
        ids = model(torch.tensor([prompt])).argmax(-1)[0, -8:].tolist()
    assert not tok.decode(ids).startswith('{"name":')

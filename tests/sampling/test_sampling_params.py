"""SamplingParams fields added for the sampling surface: bad_words, structured_outputs."""

from __future__ import annotations

import dataclasses

import pytest

from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize("kw,param", [
    (dict(bad_words=["ok", ""]), "bad_words"),
    (dict(bad_words=[3]), "bad_words"),
    (dict(structured_outputs={"json": {}, "regex": "a"}), "structured_outputs"),
    (dict(structured_outputs={"choice": ["a", 1]}), "structured_outputs"),
    (dict(structured_outputs={"regex": ""}), "structured_outputs"),
    (dict(structured_outputs={"json": 5}), "structured_outputs"),
])
def test_invalid_fields_name_their_param(kw, param):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_structured_spec_and_bad_words_survive_copies(tiny_tok):
    p = SamplingParams(bad_words=["fox"], structured_outputs={"json_object": True})
    assert p.structured_outputs.kind() == "json_object" and p.structured_outputs.spec() is None
    assert StructuredOutputsParams(choice=["a"]).spec() == ["a"]
    p.update_from_tokenizer(tiny_tok)
    assert p.bad_words_token_ids and p.clone().bad_words_token_ids == p.bad_words_token_ids
    q = p.with_defaults({"temperature": 0.3}, explicit=set())
    assert q.temperature == 0.3 and q.bad_words_token_ids == p.bad_words_token_ids
    assert "bad_words_token_ids" in {f.name for f in dataclasses.fields(p)}

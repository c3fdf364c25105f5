"""SamplingParams: how one request is decoded, with vLLM's field names and semantics.

`validate()` (called on construction) raises `ValidationError(param=...)` for every invalid field,
so the server can answer 400 naming the field. Defaults not given by the user can be filled from
`generation_config.json` with `with_defaults()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kimi_linear.errors import ValidationError

_UNSET = object()


@dataclass
class StructuredOutputsParams:
    """Constrained decoding: exactly one of `json` (a JSON schema, dict or str), `json_object`
    (any JSON object), `regex`, `choice` (list of strings), `grammar` (EBNF) or `structural_tag`
    (an xgrammar structural tag, dict or JSON text, as vLLM takes it; tokens by id or special-token name)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None

    def kind(self) -> str:
        kinds = [k for k, v in (("json", self.json is not None), ("json_object", self.json_object),
                                ("regex", self.regex is not None), ("choice", self.choice is not None),
                                ("grammar", self.grammar is not None),
                                ("structural_tag", self.structural_tag is not None)) if v]
        if len(kinds) != 1:
            raise ValidationError(f"structured_outputs needs exactly one of json, json_object, regex, choice, "
                                  f"grammar, structural_tag; got {kinds or 'none'}", param="structured_outputs")
        kind = kinds[0]
        if kind == "json" and not isinstance(self.json, (dict, str, bool)):
            raise ValidationError("structured_outputs.json must be a JSON schema (an object or a string)",
                                  param="structured_outputs")
        if kind == "choice" and not (isinstance(self.choice, list) and self.choice
                                     and all(isinstance(c, str) for c in self.choice)):
            raise ValidationError("structured_outputs.choice must be a non-empty list of strings",
                                  param="structured_outputs")
        if kind in ("regex", "grammar") and not (isinstance(getattr(self, kind), str) and getattr(self, kind)):
            raise ValidationError(f"structured_outputs.{kind} must be a non-empty string", param="structured_outputs")
        if kind == "structural_tag" and not (isinstance(self.structural_tag, dict)
                                             or (isinstance(self.structural_tag, str) and self.structural_tag)):
            raise ValidationError("structured_outputs.structural_tag must be an object or its JSON text",
                                  param="structured_outputs")
        return kind

    def spec(self):
        """The payload of `kind()`: schema, pattern, choices or grammar text (None for json_object)."""
        return {"json": self.json, "json_object": None, "regex": self.regex, "choice": self.choice,
                "grammar": self.grammar, "structural_tag": self.structural_tag}[self.kind()]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per output token (0 = only the sampled one)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # token-id sequences of `bad_words`, set by update_from_tokenizer() (or given directly)
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.bad_words is None:
            self.bad_words = []
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValidationError("logit_bias keys must be token ids and values numbers",
                                      param="logit_bias") from None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, vocab_size: int | None = None) -> None:
        def check(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise ValidationError(f"{param} {msg}", param=param)

        def num(name: str) -> float:
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool), name, f"must be a number, got {v!r}")
            return v

        def integer(name: str, optional: bool = False) -> int | None:
            v = getattr(self, name)
            if optional and v is None:
                return None
            check(isinstance(v, int) and not isinstance(v, bool), name, f"must be an integer, got {v!r}")
            return v

        check(integer("n") >= 1, "n", f"must be at least 1, got {self.n}")
        check(0.0 <= num("temperature") <= 100.0, "temperature", f"must be in [0, 100], got {self.temperature}")
        check(0.0 < num("top_p") <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(integer("top_k") >= 0, "top_k", f"must be -1 (off), 0 (off) or positive, got {self.top_k}")
        check(0.0 <= num("min_p") <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        check(-2.0 <= num("presence_penalty") <= 2.0, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= num("frequency_penalty") <= 2.0, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < num("repetition_penalty") <= 2.0, "repetition_penalty",
              f"must be in (0, 2], got {self.repetition_penalty}")
        mt = integer("max_tokens", optional=True)
        check(mt is None or mt >= 1, "max_tokens", f"must be at least 1, got {mt}")
        check(integer("min_tokens") >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        check(mt is None or self.min_tokens <= mt, "min_tokens",
              f"({self.min_tokens}) must not exceed max_tokens ({mt})")
        seed = integer("seed", optional=True)
        check(seed is None or -(2 ** 63) <= seed < 2 ** 64, "seed", "is out of range")
        lp = integer("logprobs", optional=True)
        check(lp is None or 0 <= lp <= 20, "logprobs", f"must be in [0, 20], got {lp}")
        plp = integer("prompt_logprobs", optional=True)
        check(plp is None or 0 <= plp <= 20, "prompt_logprobs", f"must be in [0, 20], got {plp}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a non-empty string or a list of non-empty strings")
        check(len(self.stop) <= 64, "stop", "has more than 64 strings")
        check(isinstance(self.stop_token_ids, list)
              and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be a list of non-negative token ids")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                check(-100.0 <= bias <= 100.0, "logit_bias", f"value for token {tok} must be in [-100, 100]")
                check(tok >= 0 and (vocab_size is None or tok < vocab_size), "logit_bias",
                      f"token id {tok} is out of the vocabulary")
        if self.allowed_token_ids is not None:
            check(isinstance(self.allowed_token_ids, list) and len(self.allowed_token_ids) > 0
                  and all(isinstance(t, int) and t >= 0 and (vocab_size is None or t < vocab_size)
                          for t in self.allowed_token_ids),
                  "allowed_token_ids", "must be a non-empty list of token ids in the vocabulary")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                check(t < vocab_size, "stop_token_ids", f"token id {t} is out of the vocabulary")
        check(isinstance(self.bad_words, list) and all(isinstance(w, str) and w.strip() for w in self.bad_words),
              "bad_words", "must be a list of non-empty strings")
        if self.structured_outputs is not None:
            check(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                  "must be an object")
            self.structured_outputs.kind()

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenize `bad_words`: each word left-stripped, and with one leading space when that tokenizes
        differently (so the word is banned at the start of the text and after a space; vLLM adds the
        spaced form only when it has as many tokens as the plain one)."""
        if not self.bad_words:
            return
        ids: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), allow_special=False)
            spaced = tokenizer.encode(" " + word.lstrip(), allow_special=False)
            if plain:
                ids.append(plain)
            if spaced and spaced != plain:
                ids.append(spaced)
        self.bad_words_token_ids = ids

    def with_defaults(self, defaults: dict[str, Any], explicit: set[str]) -> "SamplingParams":
        """A copy where the fields not in `explicit` take values from `defaults` (generation_config)."""
        names = {f.name for f in dataclasses.fields(self)}
        changes = {k: v for k, v in defaults.items() if k in names and k not in explicit}
        return dataclasses.replace(self, **changes) if changes else self

    def clone(self) -> "SamplingParams":
        return dataclasses.replace(self)

"""The xgrammar structured-output backend.

`TokenizerInfo` is built from the tokenizer's raw byte vocabulary padded to the model's vocabulary:
special ids and padding ids are empty, so xgrammar treats them as special and never allows them,
except the stop tokens (the EOS ids), which it allows exactly where the grammar may end. Kinds:
- `json`: a JSON schema (dict, bool or JSON text) -> `compile_json_schema`;
- `json_object`: any JSON object (the schema {"type": "object"}, as vLLM does);
- `regex`, `grammar` (xgrammar EBNF, GBNF-like: `root ::= ...`), `choice` (one of the given strings);
- `structural_tag` (`structural_tag.prepare`): compiled over a second vocabulary in which the special
  tokens have text, so a tag can place them (tool-call markers); built on the first such request.
`any_whitespace=False` makes JSON compact (no free whitespace between tokens): a guard for models
that loop on whitespace. xgrammar's compile errors become ValidationError(param="structured_outputs").

Workaround: xgrammar (0.2.8) compiles strings with minLength/maxLength to repeats of a class that
excludes only the quote, backslash, CR and LF, which lets raw control characters into JSON strings
(invalid JSON). JSON kinds therefore AND each filled row with a fixed mask that bans tokens containing bytes 0x00-0x1F (except tab / LF / CR when
`any_whitespace`, where they are legal whitespace between tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from kimi_linear.errors import ValidationError
from kimi_linear.structured.backend import GrammarMatcher, StructuredOutputBackend
from kimi_linear.structured.structural_tag import marker_vocab, prepare

_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _clean(err: Exception) -> str:
    """xgrammar's C++ message without its '[time] file.cc:line:' prefix, on one line."""
    msg = _CPP_PREFIX.sub("", str(err).strip())
    return " ".join(msg.split())[:500]


def _ebnf_literal(text: str) -> str:
    """`text` as an xgrammar EBNF string literal."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp <= 0xFFFF:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    return '"' + "".join(out) + '"'


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices`."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher, extra_mask: torch.Tensor | None = None):
        self._m = matcher
        self._extra = extra_mask  # [W] int32 ANDed into every filled row (JSON: no control characters)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(int(token_id)))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)
        if self._extra is not None:
            bitmask[row] &= self._extra

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


class XGrammarBackend(StructuredOutputBackend):
    def __init__(self, tokenizer, vocab_size: int | None = None, stop_token_ids: list[int] | None = None,
                 any_whitespace: bool = True, max_threads: int = 4):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size if vocab_size is not None else tokenizer.vocab_size
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_token_ids = list(stop_token_ids)
        self.any_whitespace = any_whitespace
        vocab = tokenizer.byte_vocab(self.vocab_size)
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                      stop_token_ids=self.stop_token_ids or None)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=True)
        self._json_mask = self._control_free_mask(vocab)
        self._vocab = vocab
        self._max_threads = max_threads
        self.special_ids = dict(getattr(tokenizer, "special_tokens", None) or {})  # name -> id
        self._tag_compiler = None

    def _structural_tag_compiler(self):
        """The compiler over `marker_vocab` (special tokens named), built once."""
        if self._tag_compiler is None:
            xgr = self._xgr
            vocab = marker_vocab(self._vocab, self.special_ids, self.stop_token_ids)
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                     stop_token_ids=self.stop_token_ids or None)
            self._tag_compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads, cache_enabled=True)
        return self._tag_compiler

    def _control_free_mask(self, vocab: list[bytes]) -> torch.Tensor:
        """[W] int32: the tokens with no control byte (whitespace ones allowed with any_whitespace)."""
        ok_ws = b"\t\n\r" if self.any_whitespace else b""
        banned = bytes(b for b in range(0x20) if b not in ok_ws)
        table = bytes.maketrans(b"", b"")
        bits = torch.tensor([not t or len(t.translate(table, banned)) == len(t) for t in vocab], dtype=torch.int64)
        W = (self.vocab_size + 31) // 32
        bits = torch.nn.functional.pad(bits, (0, W * 32 - len(bits))).reshape(W, 32)
        words = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=1)
        return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)

    def compile(self, kind: str, spec: Any):
        def bad(msg: str) -> ValidationError:
            return ValidationError(f"structured_outputs.{kind}: {msg}", param="structured_outputs")

        try:
            if kind == "json":
                if isinstance(spec, str):
                    try:
                        parsed = json.loads(spec)
                    except json.JSONDecodeError as e:
                        raise bad(f"the schema is not valid JSON ({e})") from None
                else:
                    parsed = spec
                if not isinstance(parsed, (dict, bool)):
                    raise bad("a JSON schema must be an object or a boolean")
                return _Compiled(self.compiler.compile_json_schema(json.dumps(parsed),
                                                                   any_whitespace=self.any_whitespace), True)
            if kind == "json_object":
                return _Compiled(self.compiler.compile_json_schema('{"type": "object"}',
                                                                   any_whitespace=self.any_whitespace), True)
            if kind == "regex":
                return _Compiled(self.compiler.compile_regex(spec), False)
            if kind == "choice":
                return _Compiled(self.compiler.compile_grammar(choice_grammar(spec)), False)
            if kind == "grammar":
                return _Compiled(self.compiler.compile_grammar(spec), False)
            if kind == "structural_tag":
                tag = prepare(spec, self.special_ids, self.any_whitespace)
                return _Compiled(self._structural_tag_compiler().compile_structural_tag(tag), False)
        except (RuntimeError, ValueError, TypeError) as e:
            if isinstance(e, ValidationError):
                raise
            raise bad(f"invalid: {_clean(e)}") from None
        raise bad("unknown kind; use json, json_object, regex, choice, grammar or structural_tag")

    def matcher(self, grammar: "_Compiled") -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(grammar.grammar), self._json_mask if grammar.is_json else None)


@dataclass(frozen=True)
class _Compiled:
    grammar: Any  # xgrammar.CompiledGrammar
    is_json: bool

"""Structural tags (xgrammar's format for tool calls and other tagged output): preparing one for compiling.

A structural tag is JSON (`{"type": "structural_tag", "format": {...}}`, or xgrammar's older
`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`, as vLLM accepts both). Special
tokens matter here: a tool-call section is delimited by special tokens (`<|tool_call_begin|>`, ...),
which the plain grammars never allow. So structural tags compile over their own vocabulary
(`marker_vocab`), where every special id except the stop ids has the text "\\n" + its name. A newline
followed by "<|" or "[" can start no JSON value and occurs in no JSON string, so inside JSON (tool
arguments) a special token is never allowed; it is allowed exactly where a `{"type": "token"}` format
names it.

`prepare(spec, special_ids, any_whitespace)` returns the tag as JSON text ready for xgrammar:
- token formats and `exclude_tokens` / `trigger_tokens` naming a special token (`"<|tool_call_begin|>"`)
  get its id (other strings are left for xgrammar to look up as plain tokens);
- each plain `json_schema` format becomes a `grammar` format compiled from the schema with the engine's
  whitespace policy (compact unless `any_whitespace`), like the `json` kind, and with raw control
  characters banned from length-bounded strings (xgrammar lets them into those: invalid JSON).
Errors are ValidationError(param="structured_outputs").
"""

from __future__ import annotations

import json
from typing import Any

from kimi_linear.errors import ValidationError

SPECIAL_TEXT_PREFIX = b"\n"
_TOKEN_LIST_KEYS = ("exclude_tokens", "trigger_tokens")
# xgrammar's class for characters of a length-bounded JSON string, and the same class without controls
_BOUNDED_STRING_CLASS = '[^\\"\\\\\\r\\n]'
_BOUNDED_STRING_CLASS_FIXED = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def _bad(msg: str) -> ValidationError:
    return ValidationError(f"structured_outputs.structural_tag: {msg}", param="structured_outputs")


def marker_vocab(byte_vocab: list[bytes], special_ids: dict[str, int], stop_token_ids) -> list[bytes]:
    """`byte_vocab` with every special id (but the stop ids) given the text "\\n" + its name."""
    vocab = list(byte_vocab)
    stops = set(stop_token_ids)
    for name, i in special_ids.items():
        if i < len(vocab) and i not in stops:
            vocab[i] = SPECIAL_TEXT_PREFIX + name.encode("utf-8")
    return vocab


def json_schema_ebnf(schema: Any, any_whitespace: bool) -> str:
    """xgrammar EBNF for a JSON schema (compact unless any_whitespace), control characters banned in strings."""
    import xgrammar as xgr

    text = schema if isinstance(schema, str) else json.dumps(schema)
    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=any_whitespace))
    return ebnf.replace(_BOUNDED_STRING_CLASS, _BOUNDED_STRING_CLASS_FIXED)


def _legacy_to_format(tag: dict) -> dict:
    """xgrammar's older {structures, triggers} form as the current format (triggered tags)."""
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not triggers:
        raise _bad("the {structures, triggers} form needs a list of structures and a non-empty list of triggers")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")):
            raise _bad(f"structures[{i}] needs string begin and end, and a schema")
        tags.append({"type": "tag", "begin": s["begin"], "end": s["end"],
                     "content": {"type": "json_schema", "json_schema": s.get("schema", True)}})
    return {"type": "triggered_tags", "triggers": triggers, "tags": tags}


def prepare(spec: Any, special_ids: dict[str, int], any_whitespace: bool) -> str:
    """The structural tag `spec` (dict or JSON text) as JSON text for xgrammar (see the module docstring)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise _bad(f"not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise _bad("must be a JSON object")
    if "structures" in spec:
        tag = {"type": "structural_tag", "format": _legacy_to_format(spec)}
    elif isinstance(spec.get("format"), dict):
        tag = {"type": "structural_tag", "format": spec["format"]}
    else:
        raise _bad('needs a "format" object (or the older "structures" and "triggers")')

    def token(value):
        return special_ids.get(value, value) if isinstance(value, str) else value

    def walk(node):
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "json_schema" and set(node) <= {"type", "json_schema", "style"} \
                and node.get("style", "json") == "json":
            if "json_schema" not in node:
                raise _bad("a json_schema format needs its json_schema")
            try:
                return {"type": "grammar", "grammar": json_schema_ebnf(node["json_schema"], any_whitespace)}
            except (RuntimeError, ValueError, TypeError) as e:
                raise _bad(f"invalid JSON schema: {' '.join(str(e).split())[:300]}") from None
        out = {k: walk(v) for k, v in node.items()}
        if kind == "token" and "token" in out:
            out["token"] = token(out["token"])
        for key in _TOKEN_LIST_KEYS:
            if isinstance(out.get(key), list):
                out[key] = [token(t) for t in out[key]]
        return out

    return json.dumps(walk(tag))

"""Structured output: grammars compiled per request, token bitmasks applied to the logits before sampling.

`backend.StructuredOutputBackend` is the interface (compile / matcher / bitmask); the xgrammar
backend (`xgrammar_backend.XGrammarBackend`) implements it. `make_backend(tokenizer, vocab_size,
stop_token_ids)` builds the default one.
"""

from kimi_linear.structured.backend import GrammarMatcher, StructuredOutputBackend, make_backend

__all__ = ["GrammarMatcher", "StructuredOutputBackend", "make_backend"]

"""StructuredOutputs: the engine's structured-output state, one per engine.

- The backend (`structured.make_backend`) is built on the first structured request, over the
  engine's tokenizer, the model's vocabulary and the engine's EOS ids (the grammar's stop tokens).
- `compile(params)` runs where requests are validated (`LLMEngine.process_inputs`), which the server
  calls from its event-loop thread while the engine thread steps: it touches only this object's
  compile cache (under a lock), never the scheduler or the runner. Compiled grammars are cached by
  (kind, spec) in insertion order, the oldest dropped beyond `max_cached`. An invalid constraint
  raises ValidationError(param="structured_outputs") for that request only.
- `matcher(grammar)` hands out one fresh GrammarMatcher per sequence (engine thread).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import StructuredOutputsParams


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, any_whitespace: bool = False,
                 max_cached: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.any_whitespace = any_whitespace
        self.max_cached = max_cached
        self._backend = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def backend(self):
        """The backend, built on first use (thread-safe)."""
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _make_backend(self):
        if self.tokenizer is None:
            raise ValidationError("structured outputs need a tokenizer, and this model folder has none "
                                  "(no tiktoken.model)", param="structured_outputs")
        try:
            from kimi_linear.structured import make_backend

            return make_backend(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                any_whitespace=self.any_whitespace)
        except ImportError as e:
            raise ValidationError(f"structured outputs are unavailable: {e} (pip install xgrammar)",
                                  param="structured_outputs") from None

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of `params` (cached). Raises ValidationError(param="structured_outputs")."""
        kind = params.kind()
        spec = params.spec()
        try:
            key = (kind, json.dumps(spec, sort_keys=True))
        except (TypeError, ValueError):
            raise ValidationError(f"structured_outputs.{kind} is not JSON-serialisable",
                                  param="structured_outputs") from None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = self.backend.compile(kind, spec)  # outside the lock: compiling can take a while
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, grammar: Any):
        """A fresh matcher (the grammar's start state) for one sequence."""
        return self.backend.matcher(grammar)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

"""The structured-output backend interface.

A backend compiles a request's constraint (`kind` in json | json_object | regex | choice | grammar |
structural_tag, with its `spec`) once, then hands out one `GrammarMatcher` per sequence. Each step, for
the rows that carry a matcher, the engine fills that row of an int32 token bitmask [B, ceil(V / 32)]
(bit j of word w allows token 32 w + j; rows without a grammar stay all ones), the sampler masks the
logits with it, and the sampled token is `accept`ed. An invalid constraint raises
ValidationError(param="structured_outputs") for that request only; the backend stays usable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch



class GrammarMatcher(ABC):
    """The grammar state of one sequence."""

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of `bitmask` (CPU int32 [B, W])."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""


class StructuredOutputBackend(ABC):
    vocab_size: int  # the model's vocabulary (bitmask width is ceil(vocab_size / 32))

    @abstractmethod
    def compile(self, kind: str, spec: Any) -> Any:
        """A compiled grammar for constraint `kind` with payload `spec` (cached by the backend)."""

    @abstractmethod
    def matcher(self, grammar: Any) -> GrammarMatcher:
        """A fresh matcher over a compiled grammar."""


def make_backend(tokenizer, vocab_size: int | None = None, stop_token_ids: list[int] | None = None,
                 name: str = "xgrammar", **kwargs) -> StructuredOutputBackend:
    """The structured-output backend `name` over `tokenizer`'s byte vocabulary, padded to `vocab_size`."""
    from kimi_linear.errors import ConfigError

    if name != "xgrammar":
        raise ConfigError("structured_outputs_backend", f"unknown backend {name!r}; available: xgrammar")
    from kimi_linear.structured.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, vocab_size, stop_token_ids, **kwargs)

"""Incremental detokenization: one `IncrementalDetokenizer` per sequence turns new token ids into text.

Invariants:
- never emits part of a multi-byte character: token bytes go through an incremental UTF-8 decoder
  (errors="replace") that holds back an incomplete sequence until its continuation bytes arrive;
- the concatenation of every `push(...)` result and the final `flush()` equals
  `tokenizer.decode(all_ids, skip_special_tokens, spaces_between_special_tokens)`, whatever the
  chunking of the ids (special tokens are whole segments; with `spaces_between_special_tokens`
  they are joined to their neighbours by one space, the Hugging Face slow-tokenizer convention).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._num_segments = 0  # segments started so far (a run of base tokens, or one special token)
        self._in_run = False  # the last kept token was a base token

    def push(self, token_ids: Iterable[int]) -> str:
        """The new complete text after appending `token_ids`."""
        tok = self.tokenizer
        out: list[str] = []
        for t in token_ids:
            if not tok.is_special(t):
                if self.spaces_between_special_tokens and not self._in_run:
                    if self._num_segments:
                        out.append(" ")
                    self._num_segments += 1
                self._in_run = True
                out.append(self._utf8.decode(tok.token_bytes(t)))
            elif self.skip_special_tokens:
                continue
            elif self.spaces_between_special_tokens:
                out.append(self._utf8.decode(b"", final=True))  # the run ends: its incomplete tail is final
                self._utf8.reset()
                if self._num_segments:
                    out.append(" ")
                self._num_segments += 1
                self._in_run = False
                out.append(tok.token_bytes(t).decode("utf-8"))
            else:
                out.append(self._utf8.decode(tok.token_bytes(t)))
        return "".join(out)

    def flush(self) -> str:
        """The held-back incomplete character at the end of the sequence, as U+FFFD (what a full decode gives)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

"""The Kimi tokenizer: tiktoken BPE ranks from `tiktoken.model` plus named special tokens.

A checkpoint folder carries `tiktoken.model` (base64 token + rank per line) and
`tokenizer_config.json` (`added_tokens_decoder`, `bos_token`, `eos_token`, `pad_token`, optionally
`chat_template`). The pre-tokenisation pattern lives only in remote code we never execute, so the
project carries it (spec section 7.1); tiktoken's regex engine supports its `&&` class intersections.

Every id from len(ranks) up to len(ranks) + 256 is special: named from `added_tokens_decoder` when
listed there, else `<|reserved_token_{id}|>`. Special-token strings in the text encode to their ids
(as the reference tokenizer does). Long inputs are split (pieces of <= 400k characters, runs of
<= 25k whitespace or non-whitespace characters) so that tiktoken never panics on them.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Sequence

from kimi_linear.errors import CheckpointError

PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_PIECE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except Exception:
                raise CheckpointError(f"{path}:{lineno}: not a 'base64-token rank' line", file=path) from None
    return ranks


def write_ranks(path: str, ranks: dict[bytes, int]) -> None:
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return None


class KimiTokenizer:
    """encode(text) -> ids, decode(ids) -> text; special tokens allowed in text."""

    def __init__(self, ranks: dict[bytes, int], added_tokens: dict[int, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, name: str = "kimi"):
        import tiktoken

        self.num_base_tokens = len(ranks)
        added_tokens = added_tokens or {}
        n = self.num_base_tokens
        top = max([n + NUM_RESERVED_SPECIAL_TOKENS - 1, *added_tokens]) if added_tokens else n + NUM_RESERVED_SPECIAL_TOKENS - 1
        self.special_tokens: dict[str, int] = {}
        for i in range(n, top + 1):
            self.special_tokens[added_tokens.get(i, f"<|reserved_token_{i}|>")] = i
        self.id_to_special = {v: k for k, v in self.special_tokens.items()}
        self.vocab_size = top + 1
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens.get(bos_token) if bos_token else None
        self.eos_token_id = self.special_tokens.get(eos_token) if eos_token else None
        self.pad_token_id = self.special_tokens.get(pad_token) if pad_token else None
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KimiTokenizer":
        path = os.fspath(path)
        model_file = os.path.join(path, TIKTOKEN_FILE)
        if not os.path.isfile(model_file):
            raise CheckpointError(f"no {TIKTOKEN_FILE} in {path}", file=model_file)
        ranks = read_ranks(model_file)
        cfg: dict = {}
        cfg_file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file} is not valid JSON: {e}", file=cfg_file) from None
        added = {}
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            content = _token_content(v)
            if content is None or not str(k).isdigit():
                raise CheckpointError(f"{cfg_file}: bad added_tokens_decoder entry {k!r}", file=cfg_file)
            added[int(k)] = content
        template = cfg.get("chat_template")
        tmpl_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(tmpl_file):
            with open(tmpl_file, encoding="utf-8") as f:
                template = f.read()
        return cls(ranks, added, _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token")),
                   _token_content(cfg.get("pad_token")), template if isinstance(template, str) else None)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        allowed = "all" if allow_special else set()
        disallowed = () if allow_special else ()
        ids: list[int] = []
        for piece in _split_long(text):
            ids.extend(self._enc.encode(piece, allowed_special=allowed, disallowed_special=disallowed))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})")
        return self._enc.decode_bytes(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (special tokens: their UTF-8 name)."""
        return self._enc.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def __len__(self) -> int:
        return self.vocab_size


def _split_long(text: str) -> Iterator[str]:
    """Pieces of <= 400k chars whose whitespace / non-whitespace runs are <= 25k chars."""
    for start in range(0, max(len(text), 1), MAX_PIECE_CHARS):
        piece = text[start:start + MAX_PIECE_CHARS]
        begin = 0
        run_start = 0
        run_is_space = piece[:1].isspace()
        for i, ch in enumerate(piece):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run_start, run_is_space = i, is_space
            elif i - run_start >= MAX_RUN_CHARS:
                yield piece[begin:i]
                begin = run_start = i
        yield piece[begin:]


def load_tokenizer(path: str | os.PathLike) -> KimiTokenizer | None:
    """The folder's tokenizer, or None when it has no tiktoken.model (token-id prompts still work)."""
    if not os.path.isfile(os.path.join(os.fspath(path), TIKTOKEN_FILE)):
        return None
    return KimiTokenizer.from_pretrained(path)

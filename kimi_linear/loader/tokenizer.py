"""The Kimi tokenizer: tiktoken BPE ranks from `tiktoken.model` plus named special tokens.

A checkpoint folder carries `tiktoken.model` (base64 token + rank per line) and
`tokenizer_config.json` (`added_tokens_decoder`, `bos_token`, `eos_token`, `pad_token`, optionally
`chat_template`). The pre-tokenisation pattern lives only in remote code we never execute, so the
project carries it (spec section 7.1); tiktoken's regex engine supports its `&&` class intersections.

Every id from len(ranks) up to len(ranks) + 256 is special: named from `added_tokens_decoder` when
listed there, else `<|reserved_token_{id}|>`. (The reference creates 258 such ids, two past the model's
vocabulary; we stop at 256, or at the highest listed id, so no text encodes to an id the model lacks.) Special-token strings in the text encode to their ids
(as the reference tokenizer does). Long inputs are split (pieces of <= 400k characters, runs of
<= 25k whitespace or non-whitespace characters) so that tiktoken never panics on them.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator, Sequence

from kimi_linear.errors import CheckpointError, ValidationError

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
    """encode(text) -> ids, decode(ids) -> text; special-token strings in text encode to their ids.

    `vocab_size` counts the base ranks plus the special ids (at least 256 of them); `num_base_tokens`
    ids below it are BPE tokens, every id from there on is special."""

    def __init__(self, ranks: dict[bytes, int], added_tokens: dict[int, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, name: str = "kimi", unk_token: str | None = None):
        import tiktoken

        self.num_base_tokens = len(ranks)
        added_tokens = added_tokens or {}
        n = self.num_base_tokens
        top = max([n + NUM_RESERVED_SPECIAL_TOKENS - 1, *added_tokens])
        self.special_tokens: dict[str, int] = {}
        for i in range(n, top + 1):
            self.special_tokens[added_tokens.get(i, f"<|reserved_token_{i}|>")] = i
        if len(self.special_tokens) != top + 1 - n:
            raise CheckpointError("tokenizer: two special ids share one name in added_tokens_decoder")
        self.id_to_special = {v: k for k, v in self.special_tokens.items()}
        self.vocab_size = top + 1
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._named_id(bos_token)
        self.eos_token_id = self._named_id(eos_token)
        self.pad_token_id = self._named_id(pad_token)
        self.unk_token_id = self._named_id(unk_token)
        self.chat_template = chat_template

    def _named_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            raise CheckpointError(f"tokenizer: special token {token!r} is not in the vocabulary") from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "KimiTokenizer":
        path = os.fspath(path)
        model_file = os.path.join(path, TIKTOKEN_FILE)
        if not os.path.isfile(model_file):
            raise CheckpointError(f"no {TIKTOKEN_FILE} in {path}", file=model_file)
        ranks = read_ranks(model_file)
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{model_file}: ranks must be 0..{len(ranks) - 1} without gaps or repeats",
                                  file=model_file)
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
        template = _template_from_config(cfg.get("chat_template"))
        template_origin = cfg_file
        tmpl_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(tmpl_file):
            try:
                with open(tmpl_file, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{tmpl_file} cannot be read: {e}", file=tmpl_file) from None
            template_origin = tmpl_file
        if template is not None:
            check_chat_template(template, template_origin)
        return cls(ranks, added, _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token")),
                   _token_content(cfg.get("pad_token")), template, unk_token=_token_content(cfg.get("unk_token")))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text` (no BOS added). With `allow_special`, special-token strings map to their ids."""
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for piece in split_long_text(text):
            ids.extend(self._enc.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               spaces_between_special_tokens: bool = False) -> str:
        """Text of `ids`: the bytes of consecutive base tokens decoded as UTF-8 (with replacement).

        With `spaces_between_special_tokens` (and special tokens kept), each special token is its own
        segment and segments are joined by one space (the Hugging Face slow-tokenizer convention)."""
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        if not spaces_between_special_tokens:
            return self._enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")
        segments: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.num_base_tokens:
                run.append(i)
                continue
            if run:
                segments.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
                run = []
            segments.append(self.id_to_special[i])
        if run:
            segments.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
        return " ".join(segments)

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        """Raw bytes of `ids` (special tokens as their UTF-8 names unless skipped)."""
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self._enc.decode_bytes(list(ids))

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise ValidationError(f"token id {i!r} is out of the vocabulary (size {self.vocab_size})",
                                      param="token_ids")

    # ------------------------------------------------------------------ byte-level helpers
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (special tokens: their UTF-8 name)."""
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    def byte_vocab(self, vocab_size: int | None = None) -> list[bytes]:
        """Bytes of every id in [0, vocab_size) (default: the tokenizer's): base tokens their bytes, special
        ids and ids past the tokenizer (a padded model vocabulary) b"". What grammar engines match against."""
        vocab_size = self.vocab_size if vocab_size is None else vocab_size
        base = [self._enc.decode_single_token_bytes(i) for i in range(min(self.num_base_tokens, vocab_size))]
        return base + [b""] * (vocab_size - len(base))

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(self.num_base_tokens, self.vocab_size))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def __len__(self) -> int:
        return self.vocab_size


def check_chat_template(template: str, file: str) -> None:
    """Refuse, at load, a checkpoint chat template that does not compile or cannot render a one-message
    conversation: else every chat request would get a 400 about a template the client never sent."""
    from kimi_linear.loader.chat_template import render_chat

    try:
        render_chat([{"role": "user", "content": "hello"}], template)
    except ValidationError as e:
        raise CheckpointError(f"{file}: the chat template cannot be used: {e}", file=file) from None


def _template_from_config(value) -> str | None:
    """`chat_template` of tokenizer_config.json: a string, or a list of {name, template} (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def _no_long_run(piece: str) -> bool:
    """Whether `piece` has no whitespace or non-whitespace run longer than MAX_RUN_CHARS (str.split splits
    on exactly the characters `\\s` matches)."""
    words = piece.split()
    return (not words or max(map(len, words)) <= MAX_RUN_CHARS) and \
        re.search(r"\s{%d}" % (MAX_RUN_CHARS + 1), piece) is None  # re caches the compiled pattern


def split_long_text(text: str) -> Iterator[str]:
    """Pieces of <= 400k chars whose whitespace / non-whitespace runs are <= 25k chars.

    Cut points equal the reference tokenizer's character loop: a piece's run that starts at s and is
    longer than 25k is cut at s + 25k, s + 50k, ... (`re`'s \\s is exactly `str.isspace`)."""
    if not text:
        yield ""
        return
    for start in range(0, len(text), MAX_PIECE_CHARS):
        piece = text[start:start + MAX_PIECE_CHARS]
        if _no_long_run(piece):  # the common case, ~6x quicker than the scan below (which holds the GIL)
            yield piece
            continue
        begin = 0
        for m in _LONG_RUN.finditer(piece):
            for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                yield piece[begin:cut]
                begin = cut
        yield piece[begin:]


def load_tokenizer(path: str | os.PathLike) -> KimiTokenizer | None:
    """The folder's tokenizer, or None when it has no tiktoken.model (token-id prompts still work)."""
    if not os.path.isfile(os.path.join(os.fspath(path), TIKTOKEN_FILE)):
        return None
    return KimiTokenizer.from_pretrained(path)

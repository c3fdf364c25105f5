"""Kimi-format tokenizer folders for the presets, and the BPE trainer that made the demo tokenizer.

A preset's tokenizer is `num_base_tokens` BPE ranks plus 256 special ids laid out like the real Kimi
tokenizer's: the same names at the same offsets from the base vocabulary ([BOS] at +0, [EOS] +1,
<|im_end|> +2, ... [PAD] +255), the other slots `<|reserved_token_{id}|>`. Written as the files the
loader reads (`loader/tokenizer.py`): tiktoken.model, tokenizer_config.json, chat_template.jinja.

The base ranks are the first `num_base_tokens` ranks of the demo model's tokenizer
(`kimi_linear/assets/demo/tiktoken.model`: 4096 ranks trained by `train_ranks` on the King James Bible,
`tools/demo_model.py`). Ranks are the training merge order and every token was checked reachable with the
ranks before it, so every prefix is itself a valid tokenizer; vocabularies larger than the demo's
(MAX_BUILT_VOCAB) get no built tokenizer. `train_ranks` trains byte-level BPE ranks with the `tokenizers`
library on given texts, pre-tokenised with the Kimi pattern.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from kimi_linear.errors import ConfigError
from kimi_linear.loader.tokenizer import (CONFIG_FILE, NUM_RESERVED_SPECIAL_TOKENS, PAT_STR, TIKTOKEN_FILE,
                                          write_ranks)

# Offsets from the base vocabulary of the named Kimi special tokens (spec section 7.1).
KIMI_SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    254: "[UNK]", 255: "[PAD]",
}
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The largest vocabulary a tokenizer is built for: the demo tokenizer's 4096 ranks + 256 specials. Larger
# ones (the 48b presets' 163840) need their tokenizer folder (`--tokenizer`, a real checkpoint's files).
MAX_BUILT_VOCAB = 4096 + NUM_RESERVED_SPECIAL_TOKENS


# --------------------------------------------------------------------------- corpus
def pretokens(text: str) -> list[str]:
    """`text` split by the Kimi pre-tokenisation pattern (BPE never merges across these pieces)."""
    import regex  # the `regex` module runs the Kimi pattern (V1 syntax has `&&` class intersection)

    return regex.findall(PAT_STR, text, flags=regex.V1)


# --------------------------------------------------------------------------- training
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable characters map, which byte-level BPE works in."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, num_shifted = {}, 0
    for b in range(256):  # the others map to 256, 257, ... in byte order
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + num_shifted)
            num_shifted += 1
    return {c: b for b, c in chars.items()}


def _tiktoken_merge(token: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's encoding of one piece: merge the adjacent pair of lowest rank until none is a token."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def train_ranks(texts: Iterable[str], num_base_tokens: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (token bytes -> rank, dense from 0) of at most `num_base_tokens` tokens:
    the 256 bytes, then the merges learned on `texts` in training order (fewer when the texts run out
    of pairs). Ties between equally frequent pairs are broken by the trainer, deterministically."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # the Kimi pattern splits the text here (pretokens); the pre-tokenizer only maps bytes to characters
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # a little slack: a merged token that tiktoken cannot reach is skipped below
    trainer = trainers.BpeTrainer(vocab_size=num_base_tokens + 64, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((piece for text in texts for piece in pretokens(text)), trainer)
    byte_of = _byte_of_char()
    ranks = {bytes([b]): b for b in range(256)}
    for text, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        token = bytes(byte_of[c] for c in text)
        if len(ranks) == num_base_tokens:
            break
        if len(token) == 1:
            continue
        ranks[token] = len(ranks)
        # reachable with the ranks so far implies reachable with any later ones (they merge later)
        if _tiktoken_merge(token, ranks) != [ranks[token]]:
            del ranks[token]
    return ranks


def build_ranks(num_base_tokens: int) -> dict[bytes, int]:
    """The BPE ranks of a preset tokenizer with `num_base_tokens` mergeable tokens: a prefix of the demo
    tokenizer's ranks (256 <= num_base_tokens <= MAX_BUILT_VOCAB - 256)."""
    from kimi_linear.loader.tokenizer import read_ranks
    from kimi_linear.tools.demo_model import DEMO_DIR

    if not 256 <= num_base_tokens <= MAX_BUILT_VOCAB - NUM_RESERVED_SPECIAL_TOKENS:
        raise ConfigError("vocab_size", f"a built tokenizer has 256..{MAX_BUILT_VOCAB - NUM_RESERVED_SPECIAL_TOKENS} "
                                        f"base tokens (a prefix of the demo tokenizer's ranks), asked for "
                                        f"{num_base_tokens}: bring a tokenizer folder for this vocabulary")
    ranks = read_ranks(os.path.join(DEMO_DIR, TIKTOKEN_FILE))
    return {tok: r for tok, r in ranks.items() if r < num_base_tokens}


# --------------------------------------------------------------------------- writing
def special_token_names(num_base_tokens: int) -> dict[int, str]:
    """id -> name of the 256 special ids after the base vocabulary, Kimi layout."""
    return {num_base_tokens + off: KIMI_SPECIAL_OFFSETS.get(off, f"<|reserved_token_{num_base_tokens + off}|>")
            for off in range(NUM_RESERVED_SPECIAL_TOKENS)}


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int, bos_token_id: int | None = None,
                    eos_token_id: int | None = None, pad_token_id: int | None = None,
                    model_max_length: int | None = None, ranks: dict[bytes, int] | None = None) -> None:
    """Write `tiktoken.model`, `tokenizer_config.json` and `chat_template.jinja` for a model whose
    vocabulary is `vocab_size` = base ranks + 256 specials (Kimi layout; bos/eos/pad must name ids in it).
    `ranks`: the base ranks to write (default: `build_ranks`, the demo tokenizer's first ranks); they must be
    exactly `vocab_size - 256` of them."""
    from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE

    num_base = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    names = special_token_names(num_base)
    for key, tid in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and tid not in names:
            raise ConfigError(key, f"{tid} is not a special id of a {vocab_size}-token Kimi vocabulary "
                                   f"({num_base}..{vocab_size - 1})")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if ranks is None:
        ranks = build_ranks(num_base)
    elif sorted(ranks.values()) != list(range(num_base)):
        raise ConfigError("vocab_size", f"the given ranks are not exactly the {num_base} base ranks 0..{num_base - 1} "
                                        f"of a {vocab_size}-token vocabulary")
    write_ranks(os.path.join(out_dir, TIKTOKEN_FILE), ranks)
    named = set(KIMI_SPECIAL_OFFSETS.values())
    cfg = {
        "added_tokens_decoder": {str(i): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, n in names.items()},
        "additional_special_tokens": [n for n in names.values() if n in named
                                      and n not in ("[BOS]", "[EOS]", "[UNK]", "[PAD]")],
        "bos_token": names.get(bos_token_id), "eos_token": names.get(eos_token_id),
        "pad_token": names.get(pad_token_id), "unk_token": names[num_base + 254],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)

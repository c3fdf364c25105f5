"""Build small Kimi-format tokenizers (for the `tiny` and `small` presets) deterministically.

A tokenizer here is `num_base_tokens` BPE ranks (the 256 single bytes, ranks 0..255 in byte order,
then merges learned by byte-level BPE on the embedded corpus `bpe_corpus.CORPUS`, pre-tokenised with
the Kimi pattern) plus 256 special ids laid out like the real Kimi tokenizer's: the same names at
the same offsets from the base vocabulary ([BOS] at +0, [EOS] +1, <|im_end|> +2, ... [PAD] +255),
the other slots `<|reserved_token_{id}|>`.

Invariants: the result is a pure function of (num_base_tokens, the corpus); every merged token is
reachable by tiktoken's merges (encoding its bytes as one piece gives exactly its own rank), because
ranks are the training merge order and a pair whose bytes already form a token reuses that token.
When the corpus runs out of pairs, training continues on a deterministic synthetic corpus
(pseudo-words, numbers, identifiers) from a fixed linear congruential generator.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter

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


# --------------------------------------------------------------------------- corpus
def _pretokens(text: str) -> Counter[bytes]:
    import regex  # the `regex` module runs the Kimi pattern (V1 syntax has `&&` class intersection)

    return Counter(m.encode("utf-8") for m in regex.findall(PAT_STR, text, flags=regex.V1))


def _synthetic_text(num_words: int) -> str:
    """Deterministic filler: pseudo-words, numbers and identifiers from a fixed LCG."""
    state = 0x2545F491
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "cl", "dr", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ng", "ck"]

    def rnd(n: int) -> int:
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (state >> 33) % n

    out = []
    for i in range(num_words):
        word = "".join(onsets[rnd(len(onsets))] + vowels[rnd(len(vowels))] + codas[rnd(len(codas))]
                       for _ in range(1 + rnd(4)))
        kind = rnd(10)
        if kind == 0:
            word = word.capitalize()
        elif kind == 1:
            word = f"{word}_{onsets[rnd(len(onsets))]}{vowels[rnd(len(vowels))]}"
        elif kind == 2:
            word = str(rnd(1000))
        out.append(word)
        out.append("\n" if i % 17 == 16 else " ")
    return "".join(out)


# --------------------------------------------------------------------------- training
def train_bpe(word_counts: Counter[bytes], num_merges: int, ranks: dict[bytes, int] | None = None,
              ) -> dict[bytes, int]:
    """Byte-level BPE: extend `ranks` (default: the 256 bytes) by up to `num_merges` new tokens.

    Ties between equally frequent pairs go to the smallest (left id, right id), so the result is
    deterministic. Returns the extended ranks (token bytes -> rank, dense from 0)."""
    ranks = dict(ranks) if ranks else {bytes([b]): b for b in range(256)}
    vocab = {r: t for t, r in ranks.items()}
    # tokenise each pre-token with the current ranks (bytes first, then the known merges in order)
    words: list[list[int]] = []
    counts: list[int] = []
    for w, c in word_counts.items():
        words.append(_apply_ranks(w, ranks))
        counts.append(c)
    pair_count: dict[tuple[int, int], int] = {}
    pair_where: dict[tuple[int, int], set[int]] = {}
    for wi, ids in enumerate(words):
        for p in zip(ids, ids[1:]):
            pair_count[p] = pair_count.get(p, 0) + counts[wi]
            pair_where.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    target = len(ranks) + num_merges
    while len(ranks) < target and heap:
        negc, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc or negc == 0:
            continue  # stale heap entry
        a, b = pair
        merged = vocab[a] + vocab[b]
        new_id = ranks.get(merged)
        if new_id is None:
            new_id = len(ranks)
            ranks[merged] = new_id
            vocab[new_id] = merged
        touched: set[tuple[int, int]] = set()
        for wi in sorted(pair_where.pop(pair, ())):
            ids, c = words[wi], counts[wi]
            for p in zip(ids, ids[1:]):
                pair_count[p] -= c
                touched.add(p)
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pair_count[p] = pair_count.get(p, 0) + c
                pair_where.setdefault(p, set()).add(wi)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
                pair_where.pop(p, None)
    return ranks


def _apply_ranks(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    parts = [word[i:i + 1] for i in range(len(word))]
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


def build_ranks(num_base_tokens: int) -> dict[bytes, int]:
    """The BPE ranks of a preset tokenizer with `num_base_tokens` mergeable tokens (>= 256)."""
    from kimi_linear.loader.bpe_corpus import CORPUS

    if num_base_tokens < 256:
        raise ConfigError("vocab_size", f"a byte-level tokenizer needs at least 256 base tokens, got {num_base_tokens}")
    ranks = train_bpe(_pretokens(CORPUS), num_base_tokens - 256)
    num_words = 20_000
    while len(ranks) < num_base_tokens:
        # the corpus ran out of pairs: continue on synthetic text (deterministic, grows until enough)
        ranks = train_bpe(_pretokens(_synthetic_text(num_words)), num_base_tokens - len(ranks), ranks)
        num_words *= 2
    return ranks


# --------------------------------------------------------------------------- writing
def special_token_names(num_base_tokens: int) -> dict[int, str]:
    """id -> name of the 256 special ids after the base vocabulary, Kimi layout."""
    return {num_base_tokens + off: KIMI_SPECIAL_OFFSETS.get(off, f"<|reserved_token_{num_base_tokens + off}|>")
            for off in range(NUM_RESERVED_SPECIAL_TOKENS)}


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int, bos_token_id: int | None = None,
                    eos_token_id: int | None = None, pad_token_id: int | None = None,
                    model_max_length: int | None = None) -> None:
    """Write `tiktoken.model`, `tokenizer_config.json` and `chat_template.jinja` for a model whose
    vocabulary is `vocab_size` = base ranks + 256 specials (Kimi layout; bos/eos/pad must name ids in it)."""
    from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE

    num_base = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    names = special_token_names(num_base)
    for key, tid in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and tid not in names:
            raise ConfigError(key, f"{tid} is not a special id of a {vocab_size}-token Kimi vocabulary "
                                   f"({num_base}..{vocab_size - 1})")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_ranks(os.path.join(out_dir, TIKTOKEN_FILE), build_ranks(num_base))
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

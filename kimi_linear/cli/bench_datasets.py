"""Request sets for `kimi-linear bench serve`, shaped like `vllm bench serve`'s datasets.

- `random`: prompts of random token ids drawn uniformly from the whole vocabulary minus the special
  tokens, lengths `--random-input-len` / `--random-output-len` (each scaled by a factor drawn in
  [1 - r, 1 + r], r = `--random-range-ratio`).
- `prefix-repetition`: `--prefix-repetition-num-prefixes` random prefixes of `--prefix-repetition-prefix-len`
  tokens; each request is one of them (in turn) plus its own random suffix of
  `--prefix-repetition-suffix-len` tokens, output `--prefix-repetition-output-len` (what prefix caching
  saves on), shuffled.
- `sharegpt`: a local ShareGPT-format JSON file (`--dataset-path`: a list of {"conversations": [{"from",
  "value"}, ...]}); each entry's first turn is the prompt, the second the reference reply, whose token
  count is the output length (or `--sharegpt-output-len`); entries too short (< 4 tokens) or too long
  (prompt > 1024 or prompt + output > 2048 tokens) are skipped, as vLLM does.

The vocabulary comes from `--tokenizer FOLDER` when given, else from the server (/tokenizer_info,
/tokenize, /detokenize, which vLLM serves too), else `--vocab-size` alone (no special tokens known; no
text prompts). Completions requests send token ids, chat requests the decoded text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

DATASETS = ("random", "prefix-repetition", "sharegpt")


class DatasetError(Exception):
    """A dataset that cannot be built as asked (the message names the flag or file)."""


@dataclass
class SampleRequest:
    prompt: str | list[int]  # text (chat, sharegpt) or token ids
    prompt_len: int
    output_len: int


@dataclass
class Vocab:
    """The token ids random prompts draw from, and the text <-> ids functions (None when not known)."""

    vocab_size: int
    special_ids: frozenset[int]
    encode: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self):
        self._allowed = [i for i in range(self.vocab_size) if i not in self.special_ids]
        if not self._allowed:
            raise DatasetError(f"no ordinary token ids in a vocabulary of {self.vocab_size}")

    def random_ids(self, rng: random.Random, n: int) -> list[int]:
        return rng.choices(self._allowed, k=n)

    @classmethod
    def from_folder(cls, path: str) -> "Vocab":
        from kimi_linear.loader.tokenizer import load_tokenizer

        tok = load_tokenizer(path) if os.path.isdir(path) else None
        if tok is None:
            raise DatasetError(f"--tokenizer {path}: no tokenizer (tiktoken.model) in that folder")
        return cls(tok.vocab_size, frozenset(tok.all_special_ids), tok.encode, tok.decode)

    @classmethod
    def from_server(cls, base: str, headers: dict, timeout: float = 30.0) -> "Vocab | None":
        """From the server's tokenizer endpoints; None when it has none."""
        import httpx

        try:
            r = httpx.get(base + "/tokenizer_info", headers=headers, timeout=timeout)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        info = r.json()
        special = frozenset(int(k) for k in (info.get("added_tokens_decoder") or {}))

        def encode(text: str) -> list[int]:
            resp = httpx.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                              headers=headers, timeout=timeout)
            resp.raise_for_status()
            return resp.json()["tokens"]

        def decode(ids: list[int]) -> str:
            resp = httpx.post(base + "/detokenize", json={"tokens": ids}, headers=headers, timeout=timeout)
            resp.raise_for_status()
            return resp.json()["prompt"]

        size = info.get("vocab_size")
        if not isinstance(size, int):  # vLLM's tokenizer_info carries no size: the highest special id bounds it
            if not special:
                return None
            size = max(special) + 1
        return cls(size, special, encode, decode)


def _scaled(mean: int, ratio: float, rng: random.Random) -> int:
    return max(1, round(mean * rng.uniform(1 - ratio, 1 + ratio)))


def _as_prompt(vocab: Vocab, ids: list[int], as_text: bool) -> str | list[int]:
    if not as_text:
        return ids
    if vocab.decode is None:
        raise DatasetError("chat prompts are text: give --tokenizer FOLDER (the server has no /tokenizer_info)")
    return vocab.decode(ids)


def random_requests(vocab: Vocab, n: int, input_len: int, output_len: int, ratio: float, rng: random.Random,
                    as_text: bool) -> list[SampleRequest]:
    if not 0 <= ratio < 1:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    out = []
    for _ in range(n):
        ids = vocab.random_ids(rng, _scaled(input_len, ratio, rng))
        out.append(SampleRequest(_as_prompt(vocab, ids, as_text), len(ids), _scaled(output_len, ratio, rng)))
    return out


def prefix_repetition_requests(vocab: Vocab, n: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                               output_len: int, rng: random.Random, as_text: bool) -> list[SampleRequest]:
    for flag, v in (("prefix-len", prefix_len), ("suffix-len", suffix_len), ("num-prefixes", num_prefixes),
                    ("output-len", output_len)):
        if v < (0 if flag == "suffix-len" else 1):
            raise DatasetError(f"--prefix-repetition-{flag} must be positive, got {v}")
    prefixes = [vocab.random_ids(rng, prefix_len) for _ in range(num_prefixes)]
    out = []
    for i in range(n):
        ids = prefixes[i % num_prefixes] + vocab.random_ids(rng, suffix_len)
        out.append(SampleRequest(_as_prompt(vocab, ids, as_text), len(ids), output_len))
    rng.shuffle(out)
    return out


def sharegpt_requests(vocab: Vocab | None, path: str | None, n: int, rng: random.Random,
                      output_len: int | None = None) -> list[SampleRequest]:
    if not path:
        raise DatasetError("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
    if vocab is None or vocab.encode is None:
        raise DatasetError("sharegpt needs a tokenizer to measure lengths: give --tokenizer FOLDER")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"--dataset-path {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"--dataset-path {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of ShareGPT entries")
    convs = [d["conversations"] for d in data if isinstance(d, dict) and isinstance(d.get("conversations"), list)
             and len(d["conversations"]) >= 2]
    rng.shuffle(convs)
    out = []
    for conv in convs:
        if len(out) == n:
            break
        try:
            prompt, reply = str(conv[0]["value"]), str(conv[1]["value"])
        except (KeyError, TypeError):
            continue
        p_len = len(vocab.encode(prompt))
        o_len = output_len if output_len is not None else len(vocab.encode(reply))
        if p_len < 4 or (output_len is None and o_len < 4) or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(SampleRequest(prompt, p_len, o_len))
    if not out:
        raise DatasetError(f"--dataset-path {path}: no usable conversation (need a prompt and a reply of 4 to "
                           f"1024 tokens)")
    if len(out) < n:  # fewer entries than prompts: cycle, as the benchmark wants n requests
        out = [out[i % len(out)] for i in range(n)]
    return out

"""Preset tokenizers: deterministic, valid tiktoken ranks, Kimi special layout, written by `init`."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import pytest
import tiktoken

from kimi_linear.config import ModelConfig
from kimi_linear.loader.tokenizer import PAT_STR, load_tokenizer
from kimi_linear.tools.create import create_checkpoint
from kimi_linear.tools.tokenizer import build_ranks, special_token_names, train_ranks


def _check_valid_ranks(ranks: dict[bytes, int], n: int) -> None:
    assert len(ranks) == n and sorted(ranks.values()) == list(range(n))
    assert all(ranks[bytes([b])] == b for b in range(256))
    enc = tiktoken.Encoding("check", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    unreachable = [t for t, r in ranks.items() if enc._encode_single_piece(t) != [r]]
    assert not unreachable, f"{len(unreachable)} tokens not reachable by merges, e.g. {unreachable[:3]}"


def test_tiny_ranks_deterministic_and_valid():
    a, b = build_ranks(768), build_ranks(768)
    assert a == b
    _check_valid_ranks(a, 768)
    assert b" the" in a and b"in" in a


def _digest(ranks: dict[bytes, int]) -> str:
    return hashlib.sha256(b"\n".join(t for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]))).hexdigest()


def test_tiny_ranks_equal_across_processes():
    """The trainer runs in Rust with per-process hash seeds; the ranks must not depend on them."""
    code = ("import hashlib; from kimi_linear.tools.tokenizer import build_ranks; r = build_ranks(768); "
            "print(hashlib.sha256(b'\\n'.join(t for t, _ in sorted(r.items(), key=lambda kv: kv[1]))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == _digest(build_ranks(768))


def test_train_ranks_stops_when_the_text_runs_out_of_pairs():
    ranks = train_ranks(["abab abab"], 1000)
    assert len(ranks) < 270 and ranks[b"ab"] == 256 and b"abab" in ranks
    _check_valid_ranks(ranks, len(ranks))


def test_tiny_special_layout():
    names = special_token_names(768)
    assert len(names) == 256 and min(names) == 768 and max(names) == 1023
    assert (names[768], names[769], names[770], names[1023]) == ("[BOS]", "[EOS]", "<|im_end|>", "[PAD]")
    assert (names[771], names[772], names[778], names[785]) == ("<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                                                                 "<|im_middle|>")
    assert names[773] == "<|reserved_token_773|>" and names[1022] == "[UNK]"


def test_init_writes_a_complete_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "tiny", weights=False, progress=False)
    cfg = ModelConfig.from_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == cfg.vocab_size == 1024 and tok.num_base_tokens == 768
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg.bos_token_id, cfg.eos_token_ids[0],
                                                                      cfg.pad_token_id)
    tcfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert len(tcfg["added_tokens_decoder"]) == 256 and tcfg["eos_token"] == "<|im_end|>"
    assert "<|im_assistant|>" in (tmp_path / "chat_template.jinja").read_text()
    assert tok.chat_template == (tmp_path / "chat_template.jinja").read_text()
    text = "Hello, world! 你好 😀"
    assert tok.decode(tok.encode(text)) == text


def test_small_preset_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "small", weights=False, progress=False)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 4352 and tok.num_base_tokens == 4096
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (4096, 4098, 4351)
    _check_valid_ranks(tok._enc._mergeable_ranks, 4096)
    # a real vocabulary (the demo tokenizer's, trained on the KJV): common English words are single tokens
    assert len(tok.encode(" the earth")) == 2


def test_preset_ranks_are_prefixes_of_the_demo_tokenizer():
    from kimi_linear.loader.tokenizer import read_ranks
    from kimi_linear.tools.demo_model import DEMO_DIR
    from kimi_linear.tools.tokenizer import MAX_BUILT_VOCAB

    demo = read_ranks(str(pathlib.Path(DEMO_DIR) / "tiktoken.model"))
    assert len(demo) + 256 == MAX_BUILT_VOCAB
    tiny = build_ranks(768)
    assert tiny == {t: r for t, r in demo.items() if r < 768} and build_ranks(4096) == demo


@pytest.mark.parametrize("n", [255, 4097])
def test_build_ranks_out_of_range_names_vocab_size(n):
    from kimi_linear.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size"):
        build_ranks(n)


def test_large_presets_write_no_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "48b-a3b", weights=False, progress=False)
    assert load_tokenizer(tmp_path) is None

"""Preset tokenizers: deterministic, valid tiktoken ranks, Kimi special layout, written by `init`."""

from __future__ import annotations

import json

import pytest
import tiktoken

from kimi_linear.config import ModelConfig
from kimi_linear.loader.tokenizer import PAT_STR, load_tokenizer
from kimi_linear.loader.tokenizer_builder import build_ranks, special_token_names
from kimi_linear.models.create import create_checkpoint


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


@pytest.mark.slow
def test_small_preset_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "small", weights=False, progress=False)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 32768 and tok.num_base_tokens == 32512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (32512, 32514, 32767)
    _check_valid_ranks(tok._enc._mergeable_ranks, 32512)
    # a real vocabulary: common English words are single tokens
    assert len(tok.encode(" the model")) == 2


def test_large_presets_write_no_tokenizer(tmp_path):
    create_checkpoint(tmp_path, "48b-a3b", weights=False, progress=False)
    assert load_tokenizer(tmp_path) is None

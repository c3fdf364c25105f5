"""Loading fails with a clear CheckpointError naming the tensor or the file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_linear import CheckpointError, KimiLinearForCausalLM


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def shard_of(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index, path / sorted(set(index["weight_map"].values()))[0]


def rewrite(path, fn):
    index, shard = shard_of(path)
    tensors = load_file(shard)
    fn(tensors, index)
    save_file(tensors, shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def load(path):
    return KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)


def test_loads_clean(ckpt):
    load(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.1.self_attn.dt_bias"

    def drop(t, index):
        del t[name]
        del index["weight_map"][name]
    rewrite(ckpt, drop)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.dt_bias") as e:
        load(ckpt)
    assert e.value.tensor == name


def test_missing_expert_tensor(ckpt):
    name = "model.layers.2.block_sparse_moe.experts.5.w3.weight"

    def drop(t, index):
        del t[name]
        del index["weight_map"][name]
    rewrite(ckpt, drop)
    with pytest.raises(CheckpointError, match=r"missing tensor .*experts\.5\.w3\.weight"):
        load(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.3.self_attn.kv_b_proj.weight"
    rewrite(ckpt, lambda t, i: t.__setitem__(name, torch.zeros(7, 3)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight has shape \[7, 3\], expected \[256, 64\]"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    def add(t, index):
        t["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(4)
        index["weight_map"]["model.layers.0.self_attn.rotary.inv_freq"] = os.path.basename(shard_of(ckpt)[1])
    rewrite(ckpt, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        load(ckpt)


def test_truncated_file(ckpt):
    _, shard = shard_of(ckpt)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load(ckpt)
    assert e.value.file and e.value.file.endswith(shard.name)
    assert shard.name in str(e.value)


def test_garbage_header(ckpt):
    _, shard = shard_of(ckpt)
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        load(ckpt)


def test_missing_shard_file(ckpt):
    _, shard = shard_of(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        load(ckpt)


def test_no_weights_at_all(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load(tmp_path)

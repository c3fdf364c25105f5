"""The cache contract: each mixer declares its cache spec, the model lists them, ModelCache allocates
from the specs alone, and the engine sizes memory from them without importing layers or ops."""

from __future__ import annotations

import ast
import pathlib

import torch

from kimi_linear.config import ModelConfig
from kimi_linear.models import KimiLinearForCausalLM, ModelCache, SequenceCache

ENGINE = pathlib.Path(__file__).resolve().parents[2] / "kimi_linear" / "engine"


def test_specs_declare_the_kernel_layouts(tiny_checkpoint):
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    specs = KimiLinearForCausalLM.cache_specs(mc, torch.bfloat16)
    assert len(specs) == mc.num_hidden_layers
    H, K, W = mc.kda_num_heads, mc.kda_head_dim, mc.conv_kernel_size
    for kind, spec in zip(mc.layer_types, specs):
        if kind == "mla":
            assert spec.paged and spec.bytes_per_slot == 0
            assert spec.token.shape == (mc.kv_cache_dim,) and spec.token.dtype == torch.bfloat16
            assert spec.bytes_per_token == mc.kv_cache_dim * 2
        else:
            assert not spec.paged and spec.bytes_per_token == 0
            assert [(s.shape, s.dtype) for s in spec.states] == [((H, K, K), torch.float32),
                                                                 ((W - 1, 3 * H * K), torch.bfloat16)]
    # the totals of the former hard-wired formulas
    assert ModelCache.bytes_per_block(specs, 16) == len(mc.mla_layers) * 16 * mc.kv_cache_dim * 2
    assert ModelCache.bytes_per_slot(specs) == len(mc.kda_layers) * (H * K * K * 4 + (W - 1) * 3 * H * K * 2)


def test_model_cache_tensors_and_reset_slots(tiny_checkpoint):
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    model = KimiLinearForCausalLM.from_config(mc, dtype=torch.float32)
    cache = model.make_cache(num_blocks=5, block_size=4, num_slots=3, device="cpu", dtype=torch.float32)
    for i, kind in enumerate(mc.layer_types):
        t = cache.tensors[i]
        if kind == "mla":
            assert t.shape == (5, 4, mc.kv_cache_dim) and t.dtype == torch.float32
        else:
            recurrent, conv = t
            assert recurrent.shape[0] == conv.shape[0] == 3 and recurrent.dtype == torch.float32
    assert len(cache.paged_tensors()) == len(mc.mla_layers)
    assert len(cache.slot_tensors()) == 2 * len(mc.kda_layers)
    for t in cache.paged_tensors() + cache.slot_tensors():
        t.fill_(1.0)
    cache.reset_slots([0, 2])
    for t in cache.slot_tensors():
        assert (t[[0, 2]] == 0).all() and (t[1] == 1).all()
    for t in cache.paged_tensors():
        assert (t == 1).all()


def test_sequence_cache_grows_paged_layers_only(tiny_checkpoint):
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    sc = SequenceCache(mc, batch_size=1, block_size=4, initial_blocks=2)
    st = sc.storage
    for t in st.paged_tensors():
        t.fill_(3.0)
    slots_before = [t for t in st.slot_tensors()]
    sc.begin_step([12])  # 3 blocks > 2
    assert st.num_blocks == 4
    for t in st.paged_tensors():
        assert t.shape[0] == 4 and (t[:2] == 3).all() and (t[2:] == 0).all()
    assert all(a is b for a, b in zip(slots_before, st.slot_tensors()))


def test_engine_never_imports_layers_or_ops():
    """Including lazy imports inside functions."""
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                assert not n.startswith(("kimi_linear.layers", "kimi_linear.ops")), f"{path.name} imports {n}"

"""The whole model's kernel path (fused norms and residual adds, tied projections, the one-launch decode
conv, the shared expert folded into the fused MoE, its sum folded into the next norm) equals the naive
path: prefill then decode through a SequenceCache, the kernels run under the Triton interpreter on the
CPU (KIMI_LINEAR_TRITON_ON_CPU=1), the same code as on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear import KimiLinearForCausalLM, SequenceCache
from kimi_linear.layers.fused import spanning


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)


def _run(model, ids, prefill: int):
    cache = SequenceCache(model.config, ids.shape[0], block_size=4, initial_blocks=8)
    outs = [model(ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache))
    return torch.cat(outs, 1), cache


@torch.no_grad()
def test_kernel_path_matches_naive_prefill_and_decode(model, monkeypatch):
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    ref, ref_cache = _run(model, ids, 5)
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    got, cache = _run(model, ids, 5)
    assert_close("kernel path vs naive (fp32 logits)", ref, got, 1e-4)
    for a, b in zip(ref_cache.storage.slot_tensors(), cache.storage.slot_tensors()):
        assert_close("KDA states", a, b, 1e-4)


def test_groups_are_tied_at_build_and_retied_after_a_split(model):
    layers = model.model.layers
    kda = next(layer.self_attn for layer in layers if layer.is_kda)
    moe = next(layer.block_sparse_moe for layer in layers if layer.is_moe)
    for module in (kda, moe, moe.shared_experts):
        for name, params in module.fused_groups().items():
            assert spanning(params) is not None, f"{type(module).__name__}.{name} is not tied after loading"
    # a parameter given its own storage (as model.to(...) does) un-ties its group; a no-grad forward re-ties it
    before = kda.q_proj.weight.detach().clone()
    kda.q_proj.weight.data = kda.q_proj.weight.data.clone()
    assert spanning(kda.fused_groups()["in"]) is None
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    with torch.no_grad():
        model(ids)
    assert spanning(kda.fused_groups()["in"]) is not None
    assert torch.equal(kda.q_proj.weight, before)


def test_autograd_uses_the_separate_parameters(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    model.requires_grad_(True)
    try:
        model(ids).float().square().mean().backward()
        kda = next(layer.self_attn for layer in model.model.layers if layer.is_kda)
        for p in kda.fused_groups()["in"] + kda.fused_groups()["fg"]:
            assert p.grad is not None and p.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_kernel_path_matches_cpu_naive(tiny_checkpoint):
    cpu = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)
    gpu = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32, progress=False)
    ids = torch.randint(0, cpu.config.vocab_size, (2, 40))
    ref, _ = _run(cpu, ids, 33)
    cache = SequenceCache(gpu.config, 2, device="cuda", block_size=16)
    outs = [gpu(ids[:, :33].cuda(), cache)] + [gpu(ids[:, t:t + 1].cuda(), cache) for t in range(33, 40)]
    assert_close("GPU kernels vs CPU naive (fp32 logits)", ref, torch.cat(outs, 1).cpu(), 1e-3)


@pytest.mark.gpu
def test_gpu_build_ties_without_stranding_memory():
    """Building allocates the weights once: no re-tie copies, and no reserved-but-unusable memory added
    (measured as deltas, so memory that earlier tests left cached does not count)."""
    import gc

    from kimi_linear.config import ModelConfig
    from kimi_linear.tools.presets import preset_config

    gc.collect()
    torch.cuda.empty_cache()
    alloc0, res0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model = KimiLinearForCausalLM.from_config(ModelConfig.from_dict(preset_config("small")), device="cuda",
                                              dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    allocated = torch.cuda.memory_allocated() - alloc0
    assert allocated <= weights * 1.01 + 2 ** 20
    stranded = (torch.cuda.memory_reserved() - res0) - allocated
    assert stranded < 64 * 2 ** 20, f"the build left {stranded / 2 ** 20:.0f} MiB reserved but unused"
    for module in model.modules():
        for name, params in getattr(module, "fused_groups", dict)().items():
            assert spanning(params) is not None, f"{type(module).__name__}.{name} not tied"

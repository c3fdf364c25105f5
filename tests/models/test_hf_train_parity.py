"""Training parity with transformers==5.23.0's KimiLinearForCausalLM: on one unpacked document in fp32,
our training call's mean loss and the gradient of every parameter equal the reference's (its loss with
labels = input_ids, shifted inside). The reference's gradients are mapped to our parameter names by
saving them as a checkpoint with its own save_pretrained (official names) and loading that through our
loader (`checkpoint_layout`), so the mapping is the one every checkpoint goes through. Also through the
grouped-GEMM MoE path (the CUDA bf16 path, run here on torch's CPU grouped GEMM).

One known difference, kept out of the inputs: transformers' embedding has `padding_idx = pad_token_id`,
so the pad token's row never gets a gradient; ours is a plain embedding (packed rows hold no padding)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

transformers = pytest.importorskip("transformers")

from test_hf_parity import CONFIGS, write_hf_checkpoint  # noqa: E402

from kimi_linear import KimiLinearForCausalLM  # noqa: E402

T = 40


def reference_grads(hf, ids, out_dir) -> tuple[float, KimiLinearForCausalLM]:
    """transformers' loss on ids, and a model of ours whose parameters hold transformers' gradients."""
    hf.zero_grad(set_to_none=True)
    loss = hf(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hf.named_parameters()}
    grads.update({n: torch.zeros_like(b) for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")})
    hf.save_pretrained(out_dir, state_dict=grads)
    return loss.item(), KimiLinearForCausalLM.from_pretrained(out_dir, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("name, grouped", [("A", False), ("B", False), ("C", False), ("B", True)])
def test_loss_and_gradients_match_transformers(name, grouped, tmp_path, monkeypatch):
    hf = write_hf_checkpoint(tmp_path / "ckpt", CONFIGS[name], seed=ord(name))
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, progress=False).train()
    # no pad token (id 0): transformers builds its embedding with padding_idx, which zeroes that row's gradient
    ids = torch.randint(1, ours.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(7))
    ref_loss, ref = reference_grads(hf, ids, tmp_path / "grads")
    if grouped:
        import kimi_linear.ops.moe as moe_ops

        monkeypatch.setattr(moe_ops, "grouped_supported", lambda *a: True)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    out = ours(ids, cu_seqlens=torch.tensor([0, T], dtype=torch.int32), labels=labels)
    (out.loss_sum / out.num_tokens).backward()
    assert int(out.num_tokens) == T - 1
    assert abs((out.loss_sum / out.num_tokens).item() - ref_loss) < 1e-5 * ref_loss
    want = dict(ref.named_parameters())
    checked = 0
    for pname, p in ours.named_parameters():
        if not p.requires_grad:
            assert pname.endswith("e_score_correction_bias"), pname
            continue
        assert p.grad is not None, f"no gradient for {pname}"
        if want[pname].norm() < 1e-6:  # top-1 renormalised routing: the weights are identically 1, no gradient
            assert p.grad.norm() < 1e-6, f"config {name}: grad of {pname} should vanish, norm {p.grad.norm():.2e}"
        else:
            assert_close(f"config {name}: grad of {pname}", want[pname], p.grad, 1e-4)
        checked += 1
    assert checked == sum(1 for p in ours.parameters() if p.requires_grad)

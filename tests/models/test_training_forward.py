"""The training call `model(input_ids [1, L], cu_seqlens=..., labels=...) -> TrainOutput`.

- A packed row of documents equals each document run alone: the logits, the loss and the gradient of
  every parameter (fp32, tight tolerance), on a tiny random model with every layer kind (KDA with its
  short conv, MLA, dense MLP, MoE), documents shorter than the conv window, one token long, and
  crossing a 64-token KDA chunk boundary inside the row.
- The loss equals the naive full-logits cross-entropy of the row's logits; the MoE statistics and the
  balance loss per document; gradient checkpointing leaves every gradient unchanged; bf16 autocast over
  fp32 master weights; untied (separately stored) parameters; clear errors for malformed inputs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.config import ModelConfig
from kimi_linear.layers.fused import spanning
from kimi_linear.models import TrainOutput
from kimi_linear.models.init import init_weights
from kimi_linear.ops.loss import naive_linear_cross_entropy
from kimi_linear.tools.presets import preset_config

DOCS = [37, 1, 30, 3]  # the first two documents end inside the first 64-token chunk, the third crosses it


def tiny_model(seed: int = 0, **overrides) -> KimiLinearForCausalLM:
    cfg = preset_config("tiny")
    cfg.update(overrides)
    model = KimiLinearForCausalLM.from_config(ModelConfig.from_dict(cfg), dtype=torch.float32)
    init_weights(model, seed=seed)
    return model.train()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def packed_row(vocab: int, lengths=DOCS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    labels = torch.full_like(ids, -100)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        labels[0, a:b - 1] = ids[0, a + 1:b]  # each document predicts its own next token; its last has none
    labels[0, 3] = -100  # and a masked position inside a document
    return ids, cu, labels


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(ref: dict, got: dict, tol: float, what: str) -> None:
    assert ref.keys() == got.keys(), f"{what}: parameters with a gradient differ: {ref.keys() ^ got.keys()}"
    for name in ref:
        assert_close(f"{what}: grad of {name}", ref[name], got[name], tol)


def test_packed_row_equals_documents_alone(model):
    ids, cu, labels = packed_row(model.config.vocab_size)
    with torch.no_grad():
        packed_logits = model(ids, cu_seqlens=cu)
    assert packed_logits.shape == (1, ids.shape[1], model.config.vocab_size)
    out = model(ids, cu_seqlens=cu, labels=labels)
    assert isinstance(out, TrainOutput)
    out.loss_sum.backward()
    packed = grads(model)

    loss_sum, num = 0.0, 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        with torch.no_grad():
            alone = model(ids[:, a:b])  # the inference entry (B = 1, no cache) on the document alone
        assert_close(f"logits of document {a}:{b}", alone, packed_logits[:, a:b], 1e-5)
        o = model(ids[:, a:b], labels=labels[:, a:b])
        o.loss_sum.backward()  # gradients accumulate over the documents
        loss_sum, num = loss_sum + o.loss_sum.item(), num + int(o.num_tokens)
    alone_grads = grads(model)
    assert int(out.num_tokens) == num == int((labels != -100).sum())
    assert abs(out.loss_sum.item() - loss_sum) <= 1e-5 * loss_sum
    assert_same_grads(alone_grads, packed, 1e-5, "packed vs alone")
    # every parameter that the loss reaches got a gradient: the router, the experts, the KDA gate, ...
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - packed.keys()
    assert missing == set(), missing
    assert all(g.abs().sum() > 0 for n, g in packed.items() if "experts" not in n), \
        [n for n, g in packed.items() if g.abs().sum() == 0]


def test_loss_equals_full_logits_cross_entropy(model):
    ids, cu, labels = packed_row(model.config.vocab_size, seed=1)
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu)[0]
        out = model(ids, cu_seqlens=cu, labels=labels)
    eye = torch.eye(logits.shape[-1])
    ref_sum, ref_num = naive_linear_cross_entropy(logits, eye, labels[0])  # identity projection: CE of logits
    assert_close("loss_sum", ref_sum, out.loss_sum, 1e-6)
    assert out.num_tokens.dtype == torch.int64 and int(out.num_tokens) == int(ref_num)
    assert out.loss_sum.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert out.aux_loss.item() == 0.0


def test_moe_statistics_and_balance_loss_per_document():
    model = tiny_model(seed=2)
    ids, cu, labels = packed_row(model.config.vocab_size, seed=2)
    k = model.config.num_experts_per_token
    model.set_moe_aux_loss_coef(0.01)
    try:
        out = model(ids, cu_seqlens=cu, labels=labels)
        for moe in model.moe_layers():
            assert moe.tokens_per_expert.shape == (model.config.num_experts,)
            assert moe.tokens_per_expert.dtype == torch.float32 and not moe.tokens_per_expert.requires_grad
            assert moe.tokens_per_expert.sum().item() == ids.shape[1] * k
        auxes = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            auxes.append(model(ids[:, a:b], labels=labels[:, a:b]).aux_loss)
        # the row's balance loss is the mean over its documents of each document's own
        assert_close("aux loss", torch.stack(auxes).mean(), out.aux_loss, 1e-5)
        assert out.aux_loss.item() > 0
        out.aux_loss.backward()
        router = model.moe_layers()[0].gate.weight
        assert router.grad is not None and router.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
        # nothing is recorded outside training mode
        model.eval()
        before = model.moe_layers()[0].tokens_per_expert.clone()
        assert model(ids[:, :5], labels=labels[:, :5]).aux_loss.item() == 0.0
        assert torch.equal(model.moe_layers()[0].tokens_per_expert, before)
    finally:
        model.set_moe_aux_loss_coef(0.0)
        model.train()


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every):
    model = tiny_model(seed=3)
    model.set_moe_aux_loss_coef(0.01)
    ids, cu, labels = packed_row(model.config.vocab_size, seed=3)
    out = model(ids, cu_seqlens=cu, labels=labels)
    (out.loss_sum / out.num_tokens + out.aux_loss).backward()
    ref = grads(model)
    model.gradient_checkpointing_enable(every=every)
    assert model.model.gradient_checkpointing_every == every
    try:
        out2 = model(ids, cu_seqlens=cu, labels=labels)
        (out2.loss_sum / out2.num_tokens + out2.aux_loss).backward()
    finally:
        model.gradient_checkpointing_disable()
    assert out2.loss_sum.item() == out.loss_sum.item() and out2.aux_loss.item() == out.aux_loss.item()
    assert_same_grads(ref, grads(model), 1e-6, f"checkpointed (every {every}) vs plain")


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_gradient_checkpointing_stride_is_checked(every):
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        tiny_model(seed=3).gradient_checkpointing_enable(every=every)


def test_bf16_autocast_over_fp32_master_weights(model):
    ids, cu, labels = packed_row(model.config.vocab_size, seed=4)
    out = model(ids, cu_seqlens=cu, labels=labels)
    out.loss_sum.backward()
    ref = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(ids, cu_seqlens=cu, labels=labels)
    assert out16.loss_sum.dtype == torch.float32
    out16.loss_sum.backward()
    got = grads(model)
    assert abs(out16.loss_sum.item() - out.loss_sum.item()) < 0.02 * out.loss_sum.item()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the router's correction bias: moved by the trainer, not by gradients
            continue
        assert p.dtype == torch.float32 and got[name].dtype == torch.float32, name
        assert torch.isfinite(got[name]).all(), name
    # bf16 gradients point the same way as the fp32 ones
    flat = torch.cat([ref[n].flatten() for n in ref])
    flat16 = torch.cat([got[n].flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(flat, flat16, dim=0) > 0.99
    for name in ("model.layers.1.self_attn.A_log", "model.layers.1.self_attn.dt_bias"):
        assert_close(f"{name} grad under autocast", ref[name], got[name], 0.1)


def test_untied_parameters_give_the_same_results():
    tied = tiny_model(seed=5)
    untied = tiny_model(seed=5)
    for p in untied.parameters():  # each parameter in its own storage, as model.to(...) or FSDP2 leave them
        p.data = p.data.clone()
    kda = untied.model.layers[1].self_attn
    assert spanning(kda.fused_groups()["in"]) is None
    ids, cu, labels = packed_row(tied.config.vocab_size, seed=5)
    outs = []
    for m in (tied, untied):
        out = m(ids, cu_seqlens=cu, labels=labels)
        out.loss_sum.backward()
        outs.append((out.loss_sum.item(), grads(m)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    assert_same_grads(outs[0][1], outs[1][1], 1e-6, "untied vs tied")
    with torch.no_grad():  # an evaluation through the training call does not re-tie (FSDP2 owns the storage)
        untied(ids, cu_seqlens=cu, labels=labels)
    assert spanning(kda.fused_groups()["in"]) is None


@pytest.mark.parametrize("bad, message", [
    (dict(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)), "end at L"),
    (dict(cu_seqlens=torch.tensor([1, 10], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), "strictly increasing"),
    (dict(cu_seqlens=torch.tensor([[0, 10]], dtype=torch.int32)), "1-D integer"),
    (dict(labels=torch.zeros(1, 9, dtype=torch.int64)), "shaped like input_ids"),
    (dict(labels=torch.full((1, 10), 5000)), "target ids"),
])
def test_malformed_training_inputs_fail_clearly(model, bad, message):
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    kwargs = dict(labels=ids.clone())
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        model(ids, **kwargs)
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        model(ids.view(2, 5), labels=ids.view(2, 5))


def test_kernel_path_equals_naive_path(monkeypatch):
    """The training call on the kernel path (Triton under the interpreter: chunk_kda's backward, the training
    conv, RMSNorm and gated-norm kernels, the CE chunk kernel, per-document SDPA) gives the naive CPU path's
    loss and gradients (fp32)."""
    model = tiny_model(seed=7)
    ids, cu, labels = packed_row(model.config.vocab_size, lengths=[5, 1, 14], seed=7)
    out = model(ids, cu_seqlens=cu, labels=labels)
    out.loss_sum.backward()
    ref = grads(model)
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    out_k = model(ids, cu_seqlens=cu, labels=labels)
    out_k.loss_sum.backward()
    assert out_k.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-5)
    assert_same_grads(ref, grads(model), 1e-4, "kernel path vs naive path")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_training_call_matches_cpu():
    """On CUDA the training call runs chunk_kda's backward, the packed conv, per-document SDPA for MLA and
    (under bf16 autocast) the grouped-GEMM experts: fp32 equals the CPU naive path; bf16 autocast stays close."""
    cpu = tiny_model(seed=6)
    gpu = tiny_model(seed=6).cuda()
    ids, cu, labels = packed_row(cpu.config.vocab_size, seed=6)
    out = cpu(ids, cu_seqlens=cu, labels=labels)
    out.loss_sum.backward()
    ref = grads(cpu)
    out_gpu = gpu(ids.cuda(), cu_seqlens=cu.cuda(), labels=labels.cuda())
    out_gpu.loss_sum.backward()
    got = {n: g.cpu() for n, g in grads(gpu).items()}
    assert out_gpu.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-4)
    assert_same_grads(ref, got, 3e-3, "CUDA vs CPU")  # the KDA kernels run their matmuls in tf32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = gpu(ids.cuda(), cu_seqlens=cu.cuda(), labels=labels.cuda())
    out16.loss_sum.backward()
    g16 = grads(gpu)
    assert out16.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=0.02)
    flat = torch.cat([ref[n].flatten() for n in ref])
    flat16 = torch.cat([g16[n].float().cpu().flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(flat, flat16, dim=0) > 0.99

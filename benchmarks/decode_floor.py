"""The bytes one batch-1 decode step must move, per category, and the kernel-name -> category map that puts
each profiled kernel beside the bytes it is there to move. One owner for both: `engine_decode.py`'s floor
(`step_bytes`) is the sum of these categories, `profile_decode.py` prints each category's time beside its floor.

Bytes (performance.md section 4), in the parameters' own dtypes (bf16 2 bytes; FP8 weights 1 byte plus their
fp32 scales), the KDA state in fp32 and the latent cache in `kv_cache_dtype`:

- projections: every parameter read by a dense GEMM/GEMV (cuBLAS, `_fp8_gemm_kernel`, `_fp8_gemv_kernel`):
  the KDA and MLA attention projections (MLA's kv_b_proj included: the absorbed decode applies it by two
  cuBLAS bmm), the dense FFN (layers < first_k_dense_replace), lm_head (a cuBLAS GEMV like the others: the
  profile cannot tell it apart by name), and the shared experts when they are not folded into the fused MoE.
- MoE experts: the k routed experts' w13 + w2 (and scales) of each MoE layer (the stacks' bytes x k / E),
  plus the shared expert: with one shared expert (the real config) `layers/moe.py` folds it into the fused
  MoE call as expert E, so the same kernels read it.
- MoE routing: the router weight and its correction bias (`_router_*` kernels, `_align_*`).
- MLA decode: the latent cache of the context read and one token written, per MLA layer:
  (context + 1) x (kv_lora_rank + qk_rope_head_dim) x kv bytes.
- KDA recurrent: the fp32 state read and written, per KDA layer: 2 x H x K x K x 4 (V = K), plus A_log and
  dt_bias (the gate is computed in the kernel).
- short conv: the conv window read and written, per KDA layer: 2 x (W - 1) x 3HK x model bytes, plus the
  conv weights.
- norms: every norm weight (layer norms, KDA o_norm, MLA kv_a_layernorm, the final norm).
- embedding / lm_head / sampling: one embedding row (the tied case reads the whole matrix as lm_head:
  counted under projections). lm_head's GEMV lands in projections (see above), so this category's kernels
  are the embedding gather and the sampler's.
- copies and elementwise, other: no bytes of their own (floor 0).
"""

from __future__ import annotations

import re

import torch

PROJ, EXPERTS, ROUTING, MLA, KDA, CONV, NORMS, EMBED, COPIES, OTHER = (
    "projections", "MoE experts", "MoE routing/top-k", "MLA decode", "KDA recurrent", "short conv", "norms",
    "embedding/lm_head/sampling", "copies/elementwise", "other")
CATEGORIES = (PROJ, EXPERTS, ROUTING, MLA, KDA, CONV, NORMS, EMBED, COPIES, OTHER)

# ---------------------------------------------------------------- kernel name -> category
# (category, lower-case substrings of the kernel name), first match wins: our Triton kernels first (their
# names contain "gemv", "topk", "scatter", which the generic rules below would take), then cuBLAS/cutlass,
# then torch's sampler and embedding kernels before its generic elementwise / reduce / copy kernels.
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (EXPERTS, ("_moe_",)),  # _moe_{up,down,sum}_kernel, _moe_gemv_{up,down}_kernel (ops/moe)
    (ROUTING, ("_router_", "_align_")),  # _router_logits[_gemv]_kernel, _router_topk_kernel, _align_*_kernel
    (MLA, ("_mla_", "_write_latent")),  # _mla_decode_{split,reduce}_kernel, _mla_prefill_kernel, _write_latent_kernel
    (KDA, ("_kda_recurrent", "chunk_kda_")),  # ops/kda/fused_recurrent.py (and the chunk kernels of a prefill)
    (CONV, ("_conv_",)),  # _conv_{decode,fwd,state}_kernel (ops/conv)
    (NORMS, ("_rms_norm", "_gated_rms_norm", "_gated_norm", "layer_norm", "rms_norm")),
    (PROJ, ("_fp8_gemm", "_fp8_gemv", "nvjet", "gemv", "gemm", "xmma", "cutlass", "cublas", "splitkreduce")),
    (EMBED, ("indexselect", "embedding", "argmax", "argmin", "softmax", "topk", "sort", "multinomial",
             "distribution", "exponential")),
    (COPIES, ("elementwise", "reduce_kernel", "index", "copy", "memcpy", "memset", "catarray", "fill")),
)


def kernel_category(name: str) -> str:
    """The category of a profiled kernel (`OTHER` when no rule matches)."""
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), OTHER)


# ---------------------------------------------------------------- parameter name -> category
_ROUTED = re.compile(r"experts\.(w13|w2)_weight(_scale|_scale_inv)?$")


def param_category(name: str, config) -> str:
    """The category whose kernels read parameter `name` at decode (see the module docstring)."""
    if _ROUTED.search(name):
        return EXPERTS
    if ".shared_experts." in name:
        return EXPERTS if config.num_shared_experts == 1 else PROJ  # folded into the fused MoE (layers/moe.py)
    if ".block_sparse_moe.gate." in name:
        return ROUTING
    if name.endswith((".A_log", ".dt_bias")):
        return KDA
    if name.endswith("_conv1d.weight"):
        return CONV
    if name.endswith("norm.weight"):
        return NORMS
    if name == "model.embed_tokens.weight":
        return PROJ if config.tie_word_embeddings else EMBED
    if re.search(r"\.weight(_scale|_scale_inv)?$", name):
        return PROJ
    return OTHER


# ---------------------------------------------------------------- bytes
def step_parts(model, context: int, kv_cache_dtype: torch.dtype | None = None
               ) -> tuple[dict[str, int], dict[str, int]]:
    """(weight bytes, state bytes) per category that one batch-1 decode step at `context` moves. Reads only
    the parameters' shapes and dtypes: a model on the meta device (`meta_model`) gives the same answer."""
    cfg = model.config
    weights = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if _ROUTED.search(name):
            b = b * cfg.num_experts_per_token // cfg.num_experts  # only the routed experts are read
        elif name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            b = p.shape[1] * p.element_size()  # one row
        weights[param_category(name, cfg)] += b
    H, K, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size
    n_kda = len(cfg.kda_layers)
    state = dict.fromkeys(CATEGORIES, 0)
    state[KDA] = n_kda * 2 * H * K * K * 4  # fp32 [H, K, V = K], read and written
    state[CONV] = n_kda * 2 * (W - 1) * 3 * H * K * model.dtype.itemsize  # q|k|v window, read and written
    kv_item = (kv_cache_dtype or model.dtype).itemsize
    state[MLA] = len(cfg.mla_layers) * cfg.kv_cache_dim * kv_item * (context + 1)  # read the context, write one
    return weights, state


def step_bytes_by_category(model, context: int, kv_cache_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes per category (every entry of CATEGORIES, in order) of one batch-1 decode step at `context`."""
    weights, state = step_parts(model, context, kv_cache_dtype)
    return {c: weights[c] + state[c] for c in CATEGORIES}


def step_bytes(model, context: int, kv_cache_dtype: torch.dtype | None = None) -> dict:
    """Bytes one batch-1 decode step moves: {"weights", "kda_state" (recurrent + conv), "latent", "total"}, in
    the parameters' own dtypes (FP8 weights count 1 byte, their fp32 scales 4) and the latent cache's
    (`kv_cache_dtype`, default the model dtype). The total is the sum of `step_bytes_by_category`."""
    weights, state = step_parts(model, context, kv_cache_dtype)
    w, kda, latent = sum(weights.values()), state[KDA] + state[CONV], state[MLA]
    return {"weights": w, "kda_state": kda, "latent": latent, "total": w + kda + latent}


def meta_model(config, dtype: torch.dtype = torch.bfloat16, quantization: str | None = None):
    """The model of `config` on the meta device (shapes and dtypes, no storage), built as the engine builds it
    (`from_config`; with `quantization="fp8"` the modules `--quantization fp8` quantizes are FP8)."""
    from kimi_linear.loader.quant import plan_quantized_load
    from kimi_linear.models.kimi_linear import KimiLinearForCausalLM

    plan = plan_quantized_load(KimiLinearForCausalLM, config, None, quantization, read_checkpoint=False)
    return KimiLinearForCausalLM.from_config(config, device="meta", dtype=dtype,
                                             fp8_modules=plan.fp8_modules if plan else None,
                                             fp8_block=plan.block if plan else None)

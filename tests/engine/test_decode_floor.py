"""`benchmarks/decode_floor.py`: the kernel-name -> category map, and the per-category bytes of a batch-1 decode
step (the floor that `profile_decode.py` prints beside each category's time), checked against a hand count.

The hand count (`hand_bytes`) is written from the shapes of spec section 1 / performance.md section 4, not by
walking the model's parameters: per KDA layer q, k, v [C, D], f_a and g_a [K, D], f_b and g_b [C, K], b_proj
[H, D], o_proj [D, C] (C = H K); per MLA layer q_proj [Hm (Dn + Dr), D], kv_a_proj_with_mqa [R + Dr, D], kv_b_proj
[Hm (Dn + Dv), R], o_proj [D, Hm Dv]; the dense layer's gate / up [I, D] and down [D, I]; per MoE layer k routed
experts' w13 [2 Im, D] + w2 [D, Im], the shared expert (the same, folded into the fused MoE), the router [E, D]
bf16 + bias [E] fp32; lm_head [V, D]; one embedding row. FP8 (`--quantization fp8`): the decoder's projections
and experts are 1 byte per weight plus one fp32 scale per output row; kv_b_proj, the router, lm_head and the
embedding stay bf16. States: KDA 2 x H K K x 4 per KDA layer, conv 2 x (W - 1) 3C x 2, latent (ctx + 1) (R + Dr) x
kv bytes per MLA layer. Models are built on the meta device: shapes and dtypes from the config, no weights.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import decode_floor as df
from benchmarks.engine_decode import step_bytes as engine_decode_step_bytes
from benchmarks.engine_decode import variant_config
from kimi_linear.config import ModelConfig
from kimi_linear.tools.presets import preset_config


# ---------------------------------------------------------------- kernel names
@pytest.mark.parametrize("name, category", [
    pytest.param("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", df.PROJ, id="nvjet"),
    pytest.param("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>",
                 df.PROJ, id="gemv2T"),
    pytest.param("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", df.PROJ,
                 id="splitKreduce"),
    pytest.param("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1", df.PROJ, id="xmma"),
    pytest.param("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>",
                 df.PROJ, id="cutlass"),
    pytest.param("_fp8_gemm_kernel", df.PROJ, id="fp8_gemm"),
    pytest.param("_fp8_gemv_kernel", df.PROJ, id="fp8_gemv"),
    pytest.param("_moe_up_kernel", df.EXPERTS, id="moe_up"),
    pytest.param("_moe_down_kernel", df.EXPERTS, id="moe_down"),
    pytest.param("_moe_gemv_up_kernel", df.EXPERTS, id="moe_gemv_up"),  # "gemv" in it: not a projection
    pytest.param("_moe_gemv_down_kernel", df.EXPERTS, id="moe_gemv_down"),
    pytest.param("_moe_sum_kernel", df.EXPERTS, id="moe_sum"),
    pytest.param("_router_logits_gemv_kernel", df.ROUTING, id="router_gemv"),
    pytest.param("_router_topk_kernel", df.ROUTING, id="router_topk"),  # "topk" in it: not the sampler
    pytest.param("_align_scatter_kernel", df.ROUTING, id="align_scatter"),
    pytest.param("_mla_decode_split_kernel", df.MLA, id="mla_split"),
    pytest.param("_mla_decode_reduce_kernel", df.MLA, id="mla_reduce"),  # "reduce_kernel" in it
    pytest.param("_write_latent_kernel", df.MLA, id="write_latent"),
    pytest.param("_kda_recurrent_kernel", df.KDA, id="kda_recurrent"),
    pytest.param("_conv_decode_kernel", df.CONV, id="conv_decode"),
    pytest.param("_rms_norm_kernel", df.NORMS, id="rms_norm"),
    pytest.param("_gated_rms_norm_kernel", df.NORMS, id="gated_rms_norm"),
    pytest.param("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long, unsigned int, "
                 "2, 2, -2>(...)", df.EMBED, id="embedding_gather"),
    pytest.param("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, "
                 "unsigned int, long, 4, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, ...>)",
                 df.EMBED, id="argmax"),
    pytest.param("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
                 "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(...)", df.EMBED, id="log_softmax"),
    pytest.param("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                 "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
                 df.COPIES, id="fill"),
    pytest.param("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<bool, at::native::func_wrapper_t<"
                 "bool, at::native::and_kernel_cuda(at::TensorIterator&)", df.COPIES, id="reduce_all"),
    pytest.param("void at::native::index_elementwise_kernel<128, 4, ...>", df.COPIES, id="index"),
    pytest.param("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::"
                 "OpaqueType<2u>, unsigned int, 2, 64, 64>(...)", df.COPIES, id="cat"),
    pytest.param("Memcpy HtoD (Pinned -> Device)", df.COPIES, id="memcpy"),
    pytest.param("Memset (Device)", df.COPIES, id="memset"),
    pytest.param("some_kernel_nobody_knows", df.OTHER, id="unknown"),
])
def test_kernel_category(name, category):
    assert df.kernel_category(name) == category


def test_every_kernel_rule_names_a_category():
    assert {c for c, _ in df.KERNEL_CATEGORIES} <= set(df.CATEGORIES)


# ---------------------------------------------------------------- the floor's bytes by hand
def hand_bytes(cfg: ModelConfig, context: int, fp8: bool = False, kv_bytes: int = 2) -> dict[str, int]:
    """Bytes per category of one batch-1 decode step, from the shapes alone (module docstring)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    H, K, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size
    C = H * K
    Hm, Dn, Dr, Dv, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                         cfg.kv_lora_rank)
    I, Im, E, k = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_token
    n_kda, n_mla = cfg.layer_types.count("kda"), cfg.layer_types.count("mla")
    n_dense, n_moe = cfg.mlp_types.count("dense"), cfg.mlp_types.count("moe")

    def lin(rows: int, cols: int, quantizable: bool = True) -> int:  # one projection weight [rows, cols]
        return rows * cols + 4 * rows if (fp8 and quantizable) else 2 * rows * cols

    kda_proj = (3 * lin(C, D) + lin(K, D) + lin(C, K) + lin(K, D) + lin(C, K) + lin(H, D) + lin(D, C))
    mla_proj = lin(Hm * (Dn + Dr), D) + lin(R + Dr, D) + lin(Hm * (Dn + Dv), R, quantizable=False) + lin(D, Hm * Dv)
    dense = 2 * lin(I, D) + lin(D, I)
    expert = lin(2 * Im, D) + lin(D, Im)  # w13 + w2 of one expert (the shared one: gate + up, down: the same)
    return {
        df.PROJ: n_kda * kda_proj + n_mla * mla_proj + n_dense * dense + lin(V, D, quantizable=False),
        df.EXPERTS: n_moe * (k + cfg.num_shared_experts) * expert,
        df.ROUTING: n_moe * (2 * E * D + 4 * E),
        df.MLA: n_mla * (context + 1) * (R + Dr) * kv_bytes,
        df.KDA: n_kda * (2 * H * K * K * 4 + 4 * (H + C)),  # state read + written, A_log [H] and dt_bias [C] fp32
        df.CONV: n_kda * (2 * (W - 1) * 3 * C * 2 + 2 * 3 * C * W),  # window read + written, the conv weights
        df.NORMS: 2 * (2 * D * cfg.num_hidden_layers + n_kda * K + n_mla * R + D),  # layer, o_norm, kv_a, final
        df.EMBED: 2 * D,  # one embedding row
        df.COPIES: 0,
        df.OTHER: 0,
    }


def _config(preset: str, variant: str = "hybrid") -> ModelConfig:
    return ModelConfig.from_dict(variant_config(preset_config(preset), variant))


@pytest.mark.parametrize("preset", ["tiny", "48b-a3b"])
@pytest.mark.parametrize("variant", ["hybrid", "mla"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_floor_bytes_match_the_hand_count(preset, variant, fp8):
    cfg = _config(preset, variant)
    model = df.meta_model(cfg, quantization="fp8" if fp8 else None)
    for context, kv in ((4096, None), (1 << 20, torch.float8_e4m3fn)):
        got = df.step_bytes_by_category(model, context, kv)
        assert list(got) == list(df.CATEGORIES)
        assert got == hand_bytes(cfg, context, fp8, kv_bytes=1 if kv else 2), (context, kv)


def test_floor_48b_a3b_figures():
    """The 48B-A3B shape at a 4K context in bf16, the arithmetic written out (performance.md section 4):
    projections 2 x (20 x 39,460,864 + 7 x 29,114,368 + 63,700,992 + 377,487,360) = 2,868,412,416;
    experts 2 x 26 x 9 x (2 x 1024 x 2304 + 2304 x 1024) = 3,312,451,584; routing 26 x (2 x 256 x 2304 +
    4 x 256) = 30,697,472; latent 7 x 4097 x 576 x 2 = 33,038,208; KDA 20 x (2 x 32 x 128 x 128 x 4 +
    4 x (32 + 4096)) = 84,216,320; conv 20 x (2 x 3 x 12288 x 2 + 2 x 12288 x 4) = 4,915,200; norms 2 x
    (27 x 2 x 2304 + 20 x 128 + 7 x 512 + 2304) = 265,728; embedding row 4,608."""
    cfg = _config("48b-a3b")
    got = df.step_bytes_by_category(df.meta_model(cfg), 4096)
    assert got == {df.PROJ: 2_868_412_416, df.EXPERTS: 3_312_451_584, df.ROUTING: 30_697_472, df.MLA: 33_038_208,
                   df.KDA: 84_216_320, df.CONV: 4_915_200, df.NORMS: 265_728, df.EMBED: 4_608, df.COPIES: 0,
                   df.OTHER: 0}
    # about 3.1B active parameters (6.2 GB in bf16) plus the states: section 4's figure
    assert 6.3e9 < sum(got.values()) < 6.4e9


@pytest.mark.parametrize("preset", ["tiny", "48b-a3b", "48b-a3b-e64"])
@pytest.mark.parametrize("variant", ["hybrid", "mla"])
@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
def test_categories_sum_to_engine_decode_floor(preset, variant, quantization):
    model = df.meta_model(_config(preset, variant), quantization=quantization)
    for context, kv in ((64, None), (4096, None), (1 << 20, torch.float8_e4m3fn)):
        total = engine_decode_step_bytes(model, context, kv)
        assert sum(df.step_bytes_by_category(model, context, kv).values()) == total["total"]
        assert total["total"] == total["weights"] + total["kda_state"] + total["latent"]


# ---------------------------------------------------------------- profile_decode's table (pure part)
def test_category_table():
    from benchmarks.profile_decode import category_table

    rows = [{"name": "nvjet_a", "us": 60.0, "calls": 3, "category": df.PROJ},
            {"name": "_moe_up_kernel", "us": 30.0, "calls": 2, "category": df.EXPERTS},
            {"name": "elementwise", "us": 10.0, "calls": 5, "category": df.COPIES}]
    floors = dict.fromkeys(df.CATEGORIES, 0) | {df.PROJ: 3_000_000, df.EXPERTS: 1_000_000}
    table = {r["category"]: r for r in category_table(rows, floors, bandwidth=1e12)}
    assert list(table) == list(df.CATEGORIES)
    assert table[df.PROJ]["floor_us"] == pytest.approx(3.0) and table[df.PROJ]["time_over_floor"] == pytest.approx(20.0)
    assert table[df.EXPERTS]["share"] == pytest.approx(0.3) and table[df.EXPERTS]["launches"] == 2
    assert table[df.COPIES]["floor_us"] is None and table[df.COPIES]["time_over_floor"] is None
    assert sum(r["share"] for r in table.values()) == pytest.approx(1.0)

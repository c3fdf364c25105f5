"""ModelConfig: the official config parses to the right layer kinds; bad configs name the bad key."""

from __future__ import annotations

import copy
import json

import pytest

from kimi_linear.config import ModelConfig
from kimi_linear.errors import ConfigError
from kimi_linear.tools.presets import preset_config

REAL = preset_config("48b-a3b")


def test_real_config_layer_kinds():
    c = ModelConfig.from_dict(REAL)
    assert c.kda_layers == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25]
    assert c.mla_layers == [3, 7, 11, 15, 19, 23, 26]
    assert c.mlp_types[0] == "dense" and all(t == "moe" for t in c.mlp_types[1:])
    assert c.kv_cache_dim == 576 and c.kda_dim == 4096 and c.qk_head_dim == 192
    assert c.num_parameters() == 49_122_681_728  # the published total


def test_roundtrip_to_hf_dict():
    c = ModelConfig.from_dict(REAL)
    assert ModelConfig.from_dict(c.to_hf_dict()) == c


def test_from_pretrained_reads_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL))
    assert ModelConfig.from_pretrained(tmp_path).num_hidden_layers == 27


def bad(mutate):
    d = copy.deepcopy(REAL)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    return str(e.value)


def test_layer_missing_from_lists():
    msg = bad(lambda d: d["linear_attn_config"]["kda_layers"].remove(5))
    assert "linear_attn_config.kda_layers" in msg and "[5]" in msg and "exactly once" in msg


def test_layer_in_both_lists():
    msg = bad(lambda d: d["linear_attn_config"]["kda_layers"].append(4))
    assert "linear_attn_config.kda_layers" in msg and "both" in msg


def test_zero_based_list_rejected():
    msg = bad(lambda d: d["linear_attn_config"]["full_attn_layers"].__setitem__(0, 0))
    assert "linear_attn_config.full_attn_layers" in msg and "1-based" in msg


def test_list_not_a_list():
    msg = bad(lambda d: d["linear_attn_config"].__setitem__("kda_layers", "1,2,3"))
    assert "linear_attn_config.kda_layers" in msg


def test_linear_attn_config_missing():
    msg = bad(lambda d: d.pop("linear_attn_config"))
    assert "linear_attn_config" in msg and "missing" in msg


def test_unknown_architecture():
    msg = bad(lambda d: d.__setitem__("architectures", ["LlamaForCausalLM"]))
    assert "architectures" in msg and "LlamaForCausalLM" in msg


def test_wrong_model_type():
    assert "model_type" in bad(lambda d: d.__setitem__("model_type", "llama"))


def test_gqa_rejected():
    msg = bad(lambda d: d.__setitem__("num_key_value_heads", 8))
    assert "num_key_value_heads" in msg


def test_q_lora_rejected():
    assert "q_lora_rank" in bad(lambda d: d.__setitem__("q_lora_rank", 1536))


def test_bad_head_dim_type():
    assert "linear_attn_config.head_dim" in bad(lambda d: d["linear_attn_config"].__setitem__("head_dim", 0))


def test_topk_exceeds_experts():
    assert "num_experts_per_token" in bad(lambda d: d.__setitem__("num_experts_per_token", 300))


def test_groups_must_divide_experts():
    assert "num_expert_group" in bad(lambda d: d.__setitem__("num_expert_group", 3))


def test_topk_group_too_small():
    def m(d):
        d["num_expert_group"] = 8
        d["topk_group"] = 0
    assert "topk_group" in bad(m)


def test_router_activation():
    assert "moe_router_activation_func" in bad(lambda d: d.__setitem__("moe_router_activation_func", "softmax"))


def test_missing_required_key():
    msg = bad(lambda d: d.pop("hidden_size"))
    assert "hidden_size" in msg and "missing" in msg


def test_bad_dtype():
    assert "dtype" in bad(lambda d: d.__setitem__("dtype", "int8"))


def test_layer_types_disagree():
    def m(d):
        d["layer_types"] = ["full_attention"] * 27
    assert "layer_types" in bad(m)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------- EngineConfig
def engine_error(tmp_path, **kw) -> ConfigError:
    from kimi_linear.engine.config import EngineConfig

    with pytest.raises(ConfigError) as e:
        EngineConfig(model=str(tmp_path), **kw)
    return e.value


def test_engine_block_size_must_be_a_power_of_two(tmp_path):
    from kimi_linear.engine.config import EngineConfig

    e = engine_error(tmp_path, block_size=48)
    assert e.key == "block_size" and "power of two" in str(e)
    assert engine_error(tmp_path, block_size=0).key == "block_size"
    assert EngineConfig(model=str(tmp_path), block_size=16).block_size == 16


@pytest.mark.parametrize("kw,key,text", [
    (dict(tensor_parallel_size=2), "tensor_parallel_size", "tensor parallelism is not supported yet"),
    (dict(quantization="int4"), "quantization", "supported: 'fp8'"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype", "'auto' or 'fp8'"),
    (dict(max_logprobs=21), "max_logprobs", "[0, 20]"),
    (dict(max_logprobs=-1), "max_logprobs", "[0, 20]"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching", "true or false"),
    (dict(trust_remote_code=1), "trust_remote_code", "true or false"),
    (dict(generation_config="nowhere/at-all"), "generation_config", "not a local folder"),
    (dict(chat_template="no_such_template.jinja"), "chat_template", "looks like a file path"),
    (dict(chat_template="{% for m in messages %}"), "chat_template", "not valid jinja2"),
    (dict(tokenizer="moonshotai/Kimi-Linear-48B-A3B-Instruct"), "tokenizer", "huggingface-cli download"),
])
def test_engine_option_errors_name_the_field(tmp_path, monkeypatch, kw, key, text):
    monkeypatch.chdir(tmp_path)
    e = engine_error(tmp_path, **kw)
    assert e.key == key and text in str(e), str(e)


def test_engine_hub_id_model(tmp_path, monkeypatch):
    from kimi_linear.engine.config import EngineConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="huggingface-cli download moonshotai/Kimi-Linear-48B-A3B-Instruct "
                                          "--local-dir DIR"):
        EngineConfig(model="moonshotai/Kimi-Linear-48B-A3B-Instruct")
    with pytest.raises(ConfigError, match="is not a folder") as e:
        EngineConfig(model=str(tmp_path / "missing"))
    assert "huggingface" not in str(e.value)


def test_engine_generation_config_folder(tmp_path):
    from kimi_linear.engine.config import EngineConfig

    (tmp_path / "gen").mkdir()
    assert engine_error(tmp_path, generation_config=str(tmp_path / "gen")).key == "generation_config"  # no file
    (tmp_path / "gen" / "generation_config.json").write_text("{}")
    cfg = EngineConfig(model=str(tmp_path), generation_config=str(tmp_path / "gen"))
    assert cfg.generation_config_dir == str(tmp_path / "gen")
    for mode in ("auto", "vllm"):
        assert EngineConfig(model=str(tmp_path), generation_config=mode).generation_config_dir == str(tmp_path)


def test_engine_chat_template_inline_and_file(tmp_path):
    from kimi_linear.engine.config import EngineConfig

    assert EngineConfig(model=str(tmp_path)).load_chat_template() is None
    inline = EngineConfig(model=str(tmp_path), chat_template="{{ messages[0]['content'] }}\\n")
    assert inline.load_chat_template() == "{{ messages[0]['content'] }}\n"  # escapes decoded, as vLLM
    (tmp_path / "t.jinja").write_text("{{ 'x' }}")
    cfg = EngineConfig(model=str(tmp_path), chat_template=str(tmp_path / "t.jinja"))
    assert cfg.load_chat_template() == "{{ 'x' }}"


def test_engine_compat_options_and_notices(tmp_path):
    from kimi_linear.engine.config import EngineConfig

    cfg = EngineConfig(model=str(tmp_path), tensor_parallel_size=1, quantization="none", trust_remote_code=True,
                       enable_prefix_caching=True)
    notices = cfg.notices()  # prefix caching is a real feature now (on by default): no notice
    assert len(notices) == 1 and "trust_remote_code has no effect" in notices[0]
    assert EngineConfig(model=str(tmp_path), enable_prefix_caching=False).notices() == []
    assert EngineConfig(model=str(tmp_path)).enable_prefix_caching is True


def test_engine_defaults_are_written_once(tmp_path):
    import inspect

    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.llm import LLM

    d = EngineConfig.defaults()
    assert d["max_num_seqs"] == 256 and d["max_num_batched_tokens"] == 8192
    assert d["gpu_memory_utilization"] == 0.9 and d["block_size"] == 64 and d["max_logprobs"] == 20
    sig = inspect.signature(LLM.__init__).parameters
    assert {k: sig[k].default for k in d} == d  # LLM's documented defaults are EngineConfig's

"""CLI flags: generated from EngineConfig (one per field, defaults only there), vLLM's recipe and common
flags accepted (implemented, or a one-line notice / a clear error), hub ids told to download first,
subcommand usage on a subcommand's error, the max_new_tokens regression in `generate`, and a busy port
failing before the model loads."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket

import pytest

from kimi_linear.cli.engine_args import engine_kwargs
from kimi_linear.cli.main import build_parser, main
from kimi_linear.engine.config import EngineConfig

HUB_ID = "moonshotai/Kimi-Linear-48B-A3B-Instruct"


def parse(*argv):
    return build_parser().parse_args(list(argv))


def run_generate(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["generate", *argv])
    c = capsys.readouterr()
    return rc, c.out, c.err


# ---------------------------------------------------------------- generated from EngineConfig
@pytest.mark.parametrize("command", [["serve"], ["generate"], ["chat"], ["bench", "latency"], ["bench", "throughput"]])
def test_every_engine_field_is_a_flag_with_its_default(command):
    args = parse(*command, "/some/folder")
    fields = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]
    for f in fields:
        assert getattr(args, f.name) == f.default, f.name
    kw = engine_kwargs(args)
    assert kw.pop("model") == "/some/folder"
    assert kw == EngineConfig.defaults()


def test_flag_names_and_types_follow_the_fields():
    args = parse("serve", "/m", "--max-num-seqs", "8", "--max-model-len", "32K", "--gpu-memory-utilization", "0.5",
                 "--enforce-eager", "--block-size", "16", "--dtype", "bfloat16", "--num-gpu-blocks-override", "7",
                 "--structured-outputs-any-whitespace", "--load-format", "dummy")
    kw = engine_kwargs(args)
    assert kw["max_num_seqs"] == 8 and kw["max_model_len"] == 32000 and kw["gpu_memory_utilization"] == 0.5
    assert kw["enforce_eager"] is True and kw["block_size"] == 16 and kw["dtype"] == "bfloat16"
    assert kw["num_gpu_blocks_override"] == 7 and kw["structured_outputs_any_whitespace"] is True
    assert kw["load_format"] == "dummy"
    with pytest.raises(SystemExit):
        parse("serve", "/m", "--load-format", "pickle")


def test_vllm_recipe_parses(tmp_path):
    args = parse("serve", str(tmp_path), "--port", "8000", "--tensor-parallel-size", "1", "--max-model-len",
                 "1048576", "--trust-remote-code")
    kw = engine_kwargs(args)
    assert args.port == 8000 and kw["tensor_parallel_size"] == 1 and kw["max_model_len"] == 1048576
    assert kw["trust_remote_code"] is True
    cfg = EngineConfig.from_kwargs(**kw)  # valid as an engine config too
    assert cfg.notices() == ["trust_remote_code has no effect: the Kimi Linear model code is built in, "
                             "no remote code runs"]


def test_common_vllm_flags_are_accepted(tmp_path):
    args = parse("serve", "--model", str(tmp_path), "-tp", "1", "--chat-template", "t.jinja",
                 "--generation-config", "vllm", "--tokenizer", str(tmp_path), "--max-logprobs", "5",
                 "--uvicorn-log-level", "debug", "--disable-log-requests", "--no-enable-prefix-caching",
                 "--quantization", "none")
    kw = engine_kwargs(args)
    assert kw["model"] == str(tmp_path) and kw["tensor_parallel_size"] == 1 and kw["chat_template"] == "t.jinja"
    assert kw["generation_config"] == "vllm" and kw["tokenizer"] == str(tmp_path) and kw["max_logprobs"] == 5
    assert kw["enable_prefix_caching"] is False and kw["quantization"] == "none"
    assert args.uvicorn_log_level == "debug" and args.log_requests is False
    assert parse("serve", "--enable-log-requests").log_requests is True
    assert parse("serve").log_requests is False and parse("serve", "--enable-prefix-caching").enable_prefix_caching


def test_serve_passes_the_server_flags(tiny_checkpoint, monkeypatch):
    import kimi_linear.server.launch as launch

    seen = {}
    monkeypatch.setattr(launch, "serve", lambda kwargs, names, **kw: seen.update(kw, kwargs=kwargs, names=names))
    assert main(["serve", str(tiny_checkpoint), "--uvicorn-log-level", "trace", "--enable-log-requests",
                 "--port", "8123"]) == 0
    assert seen["uvicorn_log_level"] == "trace" and seen["log_requests"] is True and seen["port"] == 8123
    assert seen["names"] == [tiny_checkpoint.name] and seen["kwargs"]["model"] == str(tiny_checkpoint)


# ---------------------------------------------------------------- accepted, with a notice or a clear error
def test_tensor_parallel_above_one_is_a_clear_error(tiny_checkpoint, capsys):
    for flag in ("--tensor-parallel-size", "-tp"):
        rc, _, err = run_generate(capsys, str(tiny_checkpoint), "--device", "cpu", flag, "2")
        assert rc == 2 and "tensor parallelism is not supported yet" in err and "--tensor-parallel-size" in err


def test_fp8_flags_run(tiny_checkpoint, capsys):
    rc, _, _ = run_generate(capsys, str(tiny_checkpoint), "--device", "cpu", "--quantization", "fp8",
                            "--kv-cache-dtype", "fp8", "--max-tokens", "2")
    assert rc == 0


def test_prefix_caching_runs_and_remote_code_logs_a_notice(tiny_checkpoint, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        rc, _, _ = run_generate(capsys, str(tiny_checkpoint), "--device", "cpu", "--enable-prefix-caching",
                                "--trust-remote-code", "--max-tokens", "2")
    assert rc == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert not any("prefix caching" in m for m in msgs)  # a real feature now, on by default
    assert any("trust_remote_code has no effect" in m for m in msgs)


def test_hub_id_says_download_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_generate(capsys, HUB_ID)
    assert rc == 2 and "download" in err and f"huggingface-cli download {HUB_ID} --local-dir" in err
    rc, _, err = run_generate(capsys, str(tmp_path), "--tokenizer", HUB_ID)
    assert rc == 2 and "huggingface-cli download" in err and "--tokenizer" in err


def test_model_option_alias(tiny_checkpoint, tmp_path, capsys):
    rc, out, _ = run_generate(capsys, "--model", str(tiny_checkpoint), "--device", "cpu", "--max-tokens", "2")
    assert rc == 0 and out.strip()
    rc, _, err = run_generate(capsys, str(tiny_checkpoint), "--model", str(tmp_path), "--device", "cpu")
    assert rc == 2 and "given twice" in err


# ---------------------------------------------------------------- subcommand usage on errors
@pytest.mark.parametrize("argv,usage", [(["serve", "--no-such-flag"], "usage: kimi-linear serve"),
                                        (["generate", "--no-such-flag", "x"], "usage: kimi-linear generate"),
                                        (["bench", "latency", "--no-such-flag"], "usage: kimi-linear bench latency")])
def test_unknown_flag_prints_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "unrecognized arguments: --no-such-flag" in err


# ---------------------------------------------------------------- generation config, tokenizer, template
def copy_with_generation_config(src, dst, **fields):
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update(fields)
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def test_generate_with_max_new_tokens_in_generation_config(tiny_checkpoint, tmp_path, capsys):
    """Regression: max_new_tokens in generation_config.json crashed `generate` (max_tokens given twice)."""
    m = copy_with_generation_config(tiny_checkpoint, tmp_path / "m", max_new_tokens=3)
    base = [str(m), "--device", "cpu", "--prompt", "Hi", "--temperature", "0", "--ignore-eos"]
    rc, _, err = run_generate(capsys, *base)
    assert rc == 0 and "[3 tokens, finish_reason=length]" in err
    rc, _, err = run_generate(capsys, *base, "--max-tokens", "5")
    assert rc == 0 and "[5 tokens, finish_reason=length]" in err
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 2}))
    rc, _, err = run_generate(capsys, *base, "--generation-config", str(other))
    assert rc == 0 and "[2 tokens, finish_reason=length]" in err
    rc, _, err = run_generate(capsys, *base, "--generation-config", "vllm")
    assert rc == 0 and "[64 tokens, finish_reason=length]" in err  # the CLI's own default
    rc, _, err = run_generate(capsys, *base, "--generation-config", str(tmp_path / "nowhere"))
    assert rc == 2 and "--generation-config" in err


def test_chat_with_max_new_tokens_in_generation_config(tiny_checkpoint, tmp_path, capsys):
    m = copy_with_generation_config(tiny_checkpoint, tmp_path / "m", max_new_tokens=3)
    assert main(["chat", str(m), "--device", "cpu", "--quick", "Hello", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_tokenizer_folder(tiny_checkpoint, tmp_path, capsys):
    model, tok = tmp_path / "model", tmp_path / "tok"
    shutil.copytree(tiny_checkpoint, model)
    tok.mkdir()
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        shutil.move(str(model / f), str(tok / f))
    rc, out, _ = run_generate(capsys, str(model), "--tokenizer", str(tok), "--device", "cpu", "--prompt", "Hi",
                              "--max-tokens", "3", "--temperature", "0")
    assert rc == 0 and out.strip()
    rc, _, err = run_generate(capsys, str(model), "--tokenizer", str(model), "--device", "cpu")
    assert rc == 2 and "no tokenizer" in err and "--tokenizer" in err


def test_chat_template_file_and_inline(tiny_checkpoint, tmp_path, capsys):
    from kimi_linear.llm import LLM

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    for value in (str(path), "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"):
        llm = LLM(str(tiny_checkpoint), device="cpu", max_model_len=128, chat_template=value)
        assert llm.get_tokenizer().chat_template == path.read_text()
        out = llm.chat([{"role": "user", "content": "yo"}], use_tqdm=False,
                       sampling_params=llm.get_default_sampling_params())[0]
        assert out.prompt == "[yo]"
        llm.shutdown()
    rc, _, err = run_generate(capsys, str(tiny_checkpoint), "--device", "cpu", "--chat-template", "missing.jinja")
    assert rc == 2 and "looks like a file path" in err and "--chat-template" in err


# ---------------------------------------------------------------- busy port
def test_busy_port_fails_before_loading(tiny_checkpoint, capsys, caplog, monkeypatch):
    import kimi_linear.server.launch as launch

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(launch, "make_server", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with caplog.at_level(logging.INFO):
            rc = main(["serve", str(tiny_checkpoint), "--device", "cpu", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert not any("serving" in r.getMessage() for r in caplog.records)

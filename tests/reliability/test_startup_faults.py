"""The startup-fault table: `serve` on a broken checkpoint stops with a message naming the problem
(StartupError; the CLI exits non-zero) and /health never says 200; it does not listen on, answering
503 forever (or, for a bad template / generation config / NaN weights, "healthy" and wrong)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
import torch
from harness import LoopbackServer, ServeProcess, check_envelope, free_port


def _shard(folder):
    return next(folder.glob("model-*.safetensors"))


def _rewrite_shard(folder, change):
    from safetensors.torch import load_file, save_file

    shard = _shard(folder)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def truncated_shard(folder):
    shard = _shard(folder)
    shard.write_bytes(shard.read_bytes()[:1000])
    return shard.name


def wrong_shape(folder):
    name = "model.embed_tokens.weight"

    def change(t):
        t[name] = t[name][:-1].clone()

    _rewrite_shard(folder, change)
    return name


def corrupt_tokenizer(folder):
    (folder / "tiktoken.model").write_bytes(b"\x00\xffnot a tokenizer\n\x89PNG")
    return "tiktoken.model"


def invalid_chat_template(folder):
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    return "chat_template.jinja"


def negative_temperature(folder):
    gc = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gc, "temperature": -5}))
    return "generation_config.json.temperature"


def nan_weights(folder):
    def change(t):
        for k, v in t.items():
            if v.is_floating_point():
                t[k] = torch.full_like(v, float("nan"))

    _rewrite_shard(folder, change)
    return "non-finite"


FAULTS = [truncated_shard, wrong_shape, corrupt_tokenizer, invalid_chat_template, negative_temperature, nan_weights]


@pytest.fixture
def broken(tiny_checkpoint, tmp_path, request):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    return folder, request.param(folder)


class HealthWatch:
    """Polls /health while `serve` runs; records every status seen."""

    def __init__(self, url: str):
        self.url, self.seen, self.stop = url, [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                self.seen.append(httpx.get(self.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.05)


@pytest.mark.parametrize("broken", FAULTS, indirect=True, ids=[f.__name__ for f in FAULTS])
def test_serve_stops_with_a_message_naming_the_fault(broken):
    from kimi_linear.server.launch import StartupError, serve

    folder, named = broken
    port = free_port()
    watch = HealthWatch(f"http://127.0.0.1:{port}")
    # Without the fix serve would run forever: interrupt it after a while, so the test fails instead of hanging.
    guard = threading.Timer(60, lambda: os.kill(os.getpid(), signal.SIGINT))
    guard.start()
    try:
        with pytest.raises(StartupError) as info:
            serve(dict(model=str(folder), device="cpu", max_model_len=256), ["tiny"], port=port,
                  log_level="warning", uvicorn_log_level="error")
    finally:
        guard.cancel()
        watch.stop = True
        watch.thread.join()
    assert named in str(info.value), str(info.value)
    assert 200 not in watch.seen, watch.seen


def test_cli_exits_non_zero_naming_the_file(tiny_checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    shard = truncated_shard(folder)
    proc = ServeProcess(str(folder), tmp_path / "serve.log")
    try:
        code = proc.wait(timeout=120)
        out = proc.output()
        assert code == 2, (code, out)
        assert "error: " in out and shard in out, out
    finally:
        proc.close()


def test_health_503_names_no_server_paths(tiny_checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    shard = truncated_shard(folder)
    srv = LoopbackServer(str(folder), api_key=None)
    try:
        deadline = time.time() + 60
        while srv.client.dead is None and time.time() < deadline:
            time.sleep(0.05)
        err = check_envelope(httpx.get(srv.url + "/health"), 503)
        assert shard in err["message"] and str(tmp_path) not in err["message"], err["message"]
    finally:
        srv.stop()

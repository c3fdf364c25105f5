"""Op dispatch and the package boundary.

- Each op package's public entry picks the Triton kernel or the naive form by device (CUDA, or the CPU
  under the interpreter with KIMI_LINEAR_TRITON_ON_CPU=1) and, for the norm and MoE kernels, by autograd;
  the implementations are replaced by recorders here, so nothing is computed.
- Layers call only the public entries of `kimi_linear.ops.<op>`; the ops import nothing of the package but
  `kimi_linear.errors` (checked on the source).
- Importing kimi_linear (every ops module included) and running a kernel under the interpreter leaves
  Triton's interpreter unpatched: the patches are the tests' (`tests/triton_interpreter.py`).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton_interpreter

from kimi_linear.ops.dispatch import is_interpreter

PKG = pathlib.Path(__file__).resolve().parents[2] / "kimi_linear"


def _t(device, *shape):
    return torch.zeros(*shape, device=device)


# (public entry, kernel (module, name), naive (module, name), args(device), under autograd): what runs when
# autograd needs the inputs on a kernel device: "kernel" (chunk_kda's has a backward; the recurrent KDA,
# MLA decode and cache-write kernels serve inference paths only), "naive" (the router and MoE entries), or the
# (module, name) of a differentiable training form (the cache-less conv's and the norms' training kernels,
# the per-document SDPA MLA prefill).
ENTRIES = [
    ("kimi_linear.ops.kda:chunk_kda", ("kimi_linear.ops.kda.chunk", "chunk_kda"),
     ("kimi_linear.ops.kda", "naive_chunk_kda"), lambda d: [_t(d, 1, 2, 1, 4)] * 4 + [_t(d, 1, 2, 1)], "kernel"),
    ("kimi_linear.ops.kda:fused_recurrent_kda", ("kimi_linear.ops.kda.fused_recurrent", "fused_recurrent_kda"),
     ("kimi_linear.ops.kda", "naive_recurrent_kda"), lambda d: [_t(d, 1, 2, 1, 4)] * 4 + [_t(d, 1, 2, 1)], "kernel"),
    ("kimi_linear.ops.conv:causal_conv1d", ("kimi_linear.ops.conv.short_conv", "causal_conv1d"),
     ("kimi_linear.ops.conv", "naive_causal_conv1d"), lambda d: [_t(d, 3, 4), _t(d, 4, 2)],
     ("kimi_linear.ops.conv.short_conv_train", "causal_conv1d_train")),
    ("kimi_linear.ops.mla:mla_prefill", ("kimi_linear.ops.mla.prefill", "mla_prefill"),
     ("kimi_linear.ops.mla", "naive_mla_prefill"),
     lambda d: [_t(d, 2, 1, 8), _t(d, 2, 8), None, None, [2], [0], _t(d, 8, 4), 4, 0.5],
     ("kimi_linear.ops.mla", "mla_prefill_sdpa")),
    ("kimi_linear.ops.mla:mla_decode", ("kimi_linear.ops.mla.decode", "mla_decode"),
     ("kimi_linear.ops.mla", "naive_mla_decode"),
     lambda d: [_t(d, 1, 1, 8), _t(d, 2, 4, 8), _t(d, 1, 1), _t(d, 1), _t(d, 8, 4), 4, 0.5], "kernel"),
    ("kimi_linear.ops.mla:write_latent_cache", ("kimi_linear.ops.mla.cache_write", "write_latent_cache"),
     ("kimi_linear.ops.mla", "write_latent"), lambda d: [_t(d, 2, 4, 8), _t(d, 1), _t(d, 1, 8)], "kernel"),
    ("kimi_linear.ops.norm:fused_rms_norm", ("kimi_linear.ops.norm.rmsnorm", "fused_rms_norm"),
     ("kimi_linear.ops.norm", "naive_fused_rms_norm"), lambda d: [_t(d, 2, 8), _t(d, 8), 1e-6],
     ("kimi_linear.ops.norm.rmsnorm_train", "rms_norm_train")),
    ("kimi_linear.ops.norm:fused_gated_rms_norm", ("kimi_linear.ops.norm.gated_norm", "fused_gated_rms_norm"),
     ("kimi_linear.ops.norm", "gated_rms_norm"), lambda d: [_t(d, 2, 1, 8), _t(d, 2, 1, 8), _t(d, 8), 1e-6],
     ("kimi_linear.ops.norm.gated_norm_train", "gated_rms_norm_train")),
    ("kimi_linear.ops.moe:select_experts", ("kimi_linear.ops.moe.routing", "fused_sigmoid_grouped_topk"),
     ("kimi_linear.ops.moe", "sigmoid_grouped_topk"), lambda d: [_t(d, 2, 8), _t(d, 4, 8), _t(d, 4), 2], "naive"),
    ("kimi_linear.ops.moe:fused_experts", ("kimi_linear.ops.moe.fused_moe", "fused_moe"),
     ("kimi_linear.ops.moe", "naive_fused_experts"),
     lambda d: [_t(d, 2, 8), _t(d, 4, 6, 8), _t(d, 4, 8, 3), _t(d, 2, 2), _t(d, 2, 2).long()], "naive"),
]
IDS = [e[0].split(":")[1] for e in ENTRIES]


def _record(monkeypatch, entry):
    """Replace the entry's kernel, naive (and training) implementations by recorders; return (call, calls)."""
    public, kernel, naive = entry[:3]
    calls = []
    forms = [("kernel", kernel), ("naive", naive)] + ([("train", entry[4])] if isinstance(entry[4], tuple) else [])
    for tag, (mod, name) in forms:
        monkeypatch.setattr(importlib.import_module(mod), name, lambda *a, _tag=tag, **k: (calls.append(_tag), None))
    mod, name = public.split(":")
    return getattr(importlib.import_module(mod), name), calls


@pytest.fixture
def kernel_device(monkeypatch):
    """A device whose tensors the dispatch sends to the kernels: CUDA, else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not is_interpreter():
        pytest.skip("kernels need CUDA or the Triton interpreter")
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    return torch.device("cpu")


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_cpu_tensors_run_the_naive_form(entry, monkeypatch):
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    fn, calls = _record(monkeypatch, entry)
    fn(*entry[3]("cpu"))
    assert calls == ["naive"]


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_kernel_device_runs_the_kernel(entry, kernel_device, monkeypatch):
    fn, calls = _record(monkeypatch, entry)
    with torch.no_grad():
        fn(*entry[3](kernel_device))
    assert calls == ["kernel"]


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_autograd_dispatch(entry, kernel_device, monkeypatch):
    fn, calls = _record(monkeypatch, entry)
    args = entry[3](kernel_device)
    args[0].requires_grad_()
    fn(*args)
    assert calls == [entry[4] if isinstance(entry[4], str) else "train"]


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_autocast_takes_the_training_forms(entry, kernel_device, monkeypatch):
    """Without grad but under autocast (an fp32 model evaluated during bf16 training) each entry runs what it
    runs under autograd: the inference kernels expect one dtype, the training forms promote mixed ones."""
    fn, calls = _record(monkeypatch, entry)
    with torch.no_grad(), torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        fn(*entry[3](kernel_device))
    assert calls == [entry[4] if isinstance(entry[4], str) else "train"]


# ------------------------------------------------------------------------------------------ boundaries


def _imports(tree: ast.AST) -> list[str]:
    """The dotted names a module imports (`from a.b import c` -> a.b.c)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


OPS = {"kda", "conv", "mla", "moe", "norm", "quant"}


def test_layers_call_only_the_public_op_entries():
    for path in sorted((PKG / "layers").glob("*.py")):
        tree = ast.parse(path.read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not used & {"use_triton", "use_kernel"}, f"{path.name} branches on the device itself"
        for name in _imports(tree):
            parts = name.split(".")
            if parts[:2] != ["kimi_linear", "ops"]:
                continue
            # kimi_linear.ops.<op> or a name imported from it (kimi_linear.ops.<op>.<entry>), nothing deeper
            assert len(parts) >= 3 and parts[2] in OPS, f"{path.name} imports {name}"
            if len(parts) == 4:
                mod = importlib.import_module(".".join(parts[:3]))
                assert parts[3] in mod.__all__, f"{path.name} imports {name}, not a public entry"
            assert len(parts) <= 4, f"{path.name} imports {name}"


def test_ops_import_only_errors_from_the_package():
    for path in sorted((PKG / "ops").rglob("*.py")):
        for name in _imports(ast.parse(path.read_text())):
            if name.startswith("kimi_linear.") and not name.startswith(("kimi_linear.ops", "kimi_linear.errors")):
                pytest.fail(f"{path.relative_to(PKG)} imports {name}")


# ------------------------------------------------------------------------------ interpreter patches

_CHECK = r"""
import importlib, json, pkgutil, sys
import triton.runtime.interpreter

patched = json.loads(sys.argv[1])

def snapshot():
    out = []
    for mod, cls, attr in patched:
        owner = importlib.import_module(mod)
        owner = getattr(owner, cls) if cls else owner
        out.append(id(getattr(owner, attr)))
    return out

before = snapshot()
import kimi_linear
import kimi_linear.ops as ops
for info in pkgutil.walk_packages(ops.__path__, "kimi_linear.ops."):
    importlib.import_module(info.name)
import torch
from kimi_linear.ops.norm import fused_rms_norm
y = fused_rms_norm(torch.randn(2, 16), torch.ones(16), 1e-6)  # the kernel, under the interpreter
print(json.dumps(dict(same=snapshot() == before, ran_kernel="rmsnorm" in str(sys.modules.keys()))))
"""


def test_importing_the_package_leaves_triton_unpatched():
    env = dict(os.environ, TRITON_INTERPRET="1", KIMI_LINEAR_TRITON_ON_CPU="1")
    out = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(triton_interpreter.PATCHED)], env=env,
                         cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == dict(same=True, ran_kernel=True)


def test_the_tests_patch_the_interpreter():
    if not is_interpreter():
        pytest.skip("compiled kernels: nothing to patch")
    assert triton_interpreter.is_applied()

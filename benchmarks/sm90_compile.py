"""Compile a Triton kernel for the H200 (sm_90) on a machine without a GPU, and report what decides its speed
before any device time is spent: registers and stack (spills) per thread, shared memory, how many loads
became pipelined global -> shared async copies, and which MMA generation the dots lowered to.

Triton's CUDA backend and its bundled ptxas compile for a named target without a driver; integer arguments
carry the 16-divisibility hints a real launch gives them (strides, sizes) unless listed in `no_hint`, so the
pipeliner sees what it sees on the device. Numbers come from `cuobjdump --dump-resource-usage` of the cubin.

    python -m benchmarks.sm90_compile                    # the MLA decode split kernel: bf16 and fp8 caches
    python -m benchmarks.sm90_compile --dump /tmp/ir     # also write each variant's TTGIR and PTX there
    python -m benchmarks.sm90_compile --kda              # every kernel chunk_kda launches, forward + backward

`--kda` runs the op under the interpreter, in a child process, at a small shape with the real head size
(K = V = 128) and records each launch (`capture`: argument types, constexprs, warps, stages), then compiles
what it recorded here (`compile_captured`): the launch configurations are the ones the op would use.

`compile_report` is the function; `report` runs the MLA variants in a child process (the CPU tests import triton
interpreted, which cannot compile), and tests/ops/test_sm90_compile.py holds the fp8 dual-load property to it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def available() -> bool:
    """True when this Triton can compile for sm_90 here (its nvidia backend and bundled binaries)."""
    try:
        return os.path.exists(_tool("ptxas")) and os.path.exists(_tool("cuobjdump"))
    except ImportError:
        return False


def compile_report(fn, signature: dict[str, str], constexprs: dict, *, num_warps: int = 4, num_stages: int = 2,
                   no_hint: tuple[str, ...] = (), dump: str | None = None, name: str = "kernel") -> dict:
    """Compile `fn` (a @triton.jit function) for sm_90. `signature` maps every non-constexpr argument to its
    Triton type ('*bf16', '*fp8e4nv', 'i32', 'fp32', ...); `constexprs` gives the rest. Returns regs, stack
    (bytes per thread), shared (bytes), async_copies (in the TTGIR), mma (the versions used) and the IR."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError("compile_report: triton was imported under TRITON_INTERPRET=1 (its kernels are "
                           "interpreted functions): run it in a process without that variable (see `report`)")
    names = fn.arg_names
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"compile_report: no type or value for {missing}")
    sig = {n: "constexpr" if n in constexprs else signature[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and n not in no_hint and not sig[n].startswith("fp")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    ttgir = k.asm["ttgir"]
    out = dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)), stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
               shared=int(k.metadata.shared), async_copies=ttgir.count("async_copy_global_to_local"),
               mma=sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d)", ttgir))), ttgir=ttgir)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(k.asm[ext])
    return out


_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8e4nv",
                    "float8_e5m2": "fp8e5", "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8",
                    "uint8": "u8", "bool": "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _describe(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"ptr": _TORCH_TO_TRITON[str(v.dtype).removeprefix("torch.")]}
    if v is None or isinstance(v, (bool, str)):
        return {"value": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    if hasattr(v, "value"):  # tl.constexpr
        return {"value": v.value}
    raise TypeError(f"capture: cannot describe a kernel argument of type {type(v).__name__}")


def capture(run) -> list[dict]:
    """Call `run()` with triton imported under TRITON_INTERPRET=1 (the CPU tests' mode) and record every
    kernel launch: module, name, each argument (a pointer's dtype, an int, a float or a constant) and the
    launch options. Identical launches are recorded once. Returns the records (JSON-able)."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run
    seen: dict[str, dict] = {}

    def record(self, *args, grid, warmup, **kwargs):
        import json

        opts = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in opts})
        bound.apply_defaults()
        rec = dict(module=self.fn.__module__, name=self.fn.__name__,
                   args={n: _describe(v) for n, v in bound.arguments.items()}, options=opts)
        seen.setdefault(json.dumps(rec, sort_keys=True), rec)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        run()
    finally:
        InterpretedFunction.run = orig
    return list(seen.values())


def compile_captured(rec: dict, dump: str | None = None) -> dict:
    """Compile one `capture` record for sm_90 as a launch would: integer 1 becomes a constant and integers
    divisible by 16 carry the divisibility hint (unless the kernel lists them in do_not_specialize)."""
    import importlib

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    sig, consts, no_hint = {}, {}, []
    for p in fn.params:
        d = rec["args"][p.name]
        if p.is_constexpr or "value" in d:
            consts[p.name] = d.get("value", d.get("int", d.get("float")))
        elif "ptr" in d:
            sig[p.name] = "*" + d["ptr"]
        elif "float" in d:
            sig[p.name] = "fp32"
        elif d["int"] == 1 and not p.do_not_specialize:
            consts[p.name] = 1
        else:
            sig[p.name] = "i32" if -2 ** 31 <= d["int"] < 2 ** 31 else "i64"
            if d["int"] % 16 or p.do_not_specialize:
                no_hint.append(p.name)
    opts = rec.get("options", {})
    return compile_report(fn, sig, consts, num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3),
                          no_hint=tuple(no_hint), dump=dump, name=rec["name"])


def kda_launches(T: int = 128, H: int = 2, K: int = 128, backward: bool = True) -> list[dict]:
    """The launches of `chunk_kda` (gate, beta sigmoid and L2 norm in the kernel, as the model calls it) at
    [1, T, H, K], forward and (with `backward`) backward, recorded under the interpreter."""
    import torch

    from kimi_linear.ops.kda import chunk_kda

    def run():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, H, K, generator=g, dtype=torch.bfloat16).requires_grad_(backward)
                   for _ in range(3))
        f = torch.randn(1, T, H, K, generator=g, dtype=torch.bfloat16).requires_grad_(backward)
        beta = torch.randn(1, T, H, generator=g, dtype=torch.bfloat16).requires_grad_(backward)
        A_log = torch.rand(H, generator=g).requires_grad_(backward)
        dt_bias = torch.zeros(H * K).requires_grad_(backward)
        o, _ = chunk_kda(q, k, v, f, beta, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                         dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
        if backward:
            o.float().sum().backward()

    return capture(run)


def mla_decode_split(cache_dtype: str = "bf16", *, dual_load: bool = False, block_n: int = 32, num_warps: int = 4,
                     num_stages: int = 2, dump: str | None = None) -> dict:
    """The MLA decode split kernel at the real shape (H=32, R=512, Dr=64, block size 64), bf16 queries,
    `cache_dtype` 'bf16' or 'fp8e4nv'."""
    from kimi_linear.ops.mla.decode import MIN_CHUNK, _mla_decode_split_kernel

    ptr = dict(q_lat="*bf16", q_pe="*bf16", cache=f"*{cache_dtype}", block_tables="*i32", seq_lens="*i32",
               part_o="*fp32", part_lse="*fp32", scale_log2="fp32")
    consts = dict(H=32, R=512, DR=64, BS=64, MIN_CHUNK=MIN_CHUNK, BLOCK_H=32, BLOCK_N=block_n, BLOCK_R=512,
                  BLOCK_DR=64, PREC="tf32", PREFETCH=False, DUAL_LOAD=dual_load)
    sig = {n: ptr.get(n, "i32") for n in _mla_decode_split_kernel.arg_names if n not in consts}
    name = f"mla_split_{cache_dtype}{'_dl' if dual_load else ''}_bn{block_n}_w{num_warps}_s{num_stages}"
    return compile_report(_mla_decode_split_kernel, sig, consts, num_warps=num_warps, num_stages=num_stages,
                          no_hint=("NUM_SPLITS",), dump=dump, name=name)


MLA_VARIANTS = (("bf16", False), ("fp8e4nv", False), ("fp8e4nv", True))


def report(timeout: float = 300.0) -> dict:
    """The MLA variants' reports from a child process without TRITON_INTERPRET (callable from the CPU tests,
    whose triton is imported interpreted): {"bf16": ..., "fp8e4nv": ..., "fp8e4nv/dl": ...}, IR left out."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "report.json")
        subprocess.run([sys.executable, "-m", "benchmarks.sm90_compile", "--json", path], cwd=root, env=env,
                       check=True, timeout=timeout, capture_output=True)
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> int:
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", default=None, help="write each variant's TTGIR and PTX into this folder")
    ap.add_argument("--json", default=None, help="write the reports (without the IR) to this file")
    ap.add_argument("--kda", action="store_true", help="every kernel chunk_kda launches (forward + backward)")
    ap.add_argument("--records", default=None, help=argparse.SUPPRESS)  # compile these recorded launches
    ap.add_argument("--capture-kda", default=None, help=argparse.SUPPRESS)  # the recording child of --kda
    args = ap.parse_args(argv)
    if args.capture_kda:
        return _capture_kda(args.capture_kda)
    if not available():
        raise SystemExit("this Triton has no nvidia backend binaries (ptxas, cuobjdump): cannot compile for sm_90")
    if args.kda:
        return _kda_main(args)
    if args.records:
        return _compile_records(args)
    print(f"Triton {triton.__version__}, target sm_90; MLA decode split kernel (H=32, R=512, Dr=64, BS=64)")
    print(f"{'cache':8s} {'launch':22s} {'regs':>5s} {'stack B':>8s} {'shared B':>9s} {'async copies':>13s}  mma")
    out = {}
    for dt, dl in MLA_VARIANTS:
        r = mla_decode_split(dt, dual_load=dl, dump=args.dump)
        out[dt + ("/dl" if dl else "")] = {k: v for k, v in r.items() if k != "ttgir"}
        launch = "dual_load" if dl else "one load"
        print(f"{dt:8s} {launch:22s} {r['regs']:5d} {r['stack']:8d} {r['shared']:9d} {r['async_copies']:13d}  "
              f"v{','.join(r['mma'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _kda_main(args) -> int:
    """Record chunk_kda's launches in a child process under the interpreter, then compile them here."""
    import sys

    if triton.knobs.runtime.interpret:
        raise SystemExit("run --kda without TRITON_INTERPRET (it records under the interpreter in a child)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", KIMI_LINEAR_TRITON_ON_CPU="1")
    with tempfile.TemporaryDirectory() as d:
        rpath = os.path.join(d, "records.json")
        subprocess.run([sys.executable, "-m", "benchmarks.sm90_compile", "--capture-kda", rpath], cwd=root,
                       env=env, check=True)
        args.records = rpath
        return _compile_records(args)


def _capture_kda(path: str) -> int:
    """The child of --kda: triton was imported interpreted (TRITON_INTERPRET=1 in its environment)."""
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    import triton_interpreter  # the tests' fixes of the interpreter's own bugs (int32 masks, bf16 dots)

    triton_interpreter.apply()
    with open(path, "w") as f:
        json.dump(kda_launches(), f)
    return 0


def _compile_records(args) -> int:
    import json

    with open(args.records) as f:
        recs = json.load(f)
    print(f"Triton {triton.__version__}, target sm_90; {len(recs)} recorded launches")
    print(f"{'kernel':40s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'stack B':>8s} {'shared B':>9s} "
          f"{'async':>6s}  mma")
    out = []
    for rec in recs:
        r = compile_captured(rec, dump=args.dump)
        opts = rec.get("options", {})
        print(f"{rec['name'][:40]:40s} {opts.get('num_warps', 4):5d} {opts.get('num_stages', 3):6d} {r['regs']:5d} "
              f"{r['stack']:8d} {r['shared']:9d} {r['async_copies']:6d}  v{','.join(r['mma']) or '-'}")
        out.append(dict(rec, report={k: v for k, v in r.items() if k != "ttgir"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

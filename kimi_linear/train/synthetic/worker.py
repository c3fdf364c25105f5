"""A worker process of `kimi-linear synthetic`: `python -m kimi_linear.train.synthetic.worker SPECS_JSON CURVES [DEADLINE]`.

Runs one `RunSpec` (train_one.py), or a list of them one after another (a lane of the suite: the imports and
the CUDA context are paid once), each run getting its share of what is left until DEADLINE (a
`time.time()` value; none: each its own `wall_s`): `spec.share` over the shares of the runs not yet started,
so time a run leaves unused (solved early) goes to those after it, and appends each evaluation record to CURVES as one JSON line, written with a
single `write` on a file opened for appending (so records of workers sharing the file never interleave), and
flushed at once: a worker killed mid-run leaves every point it measured. A failure is recorded as a line with
`"event": "error"` and its message, and the worker exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def append_record(path: str, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = argv if argv is not None else sys.argv[1:]
    specs_json, curves = args[:2]
    deadline = float(args[2]) if len(args) > 2 else None
    from kimi_linear.train.synthetic.train_one import RunSpec, train_one

    loaded = json.loads(specs_json)
    specs = [RunSpec(**d) for d in (loaded if isinstance(loaded, list) else [loaded])]
    torch.set_num_threads(int(os.environ.get("KIMI_LINEAR_SYNTHETIC_THREADS", "1")))
    device = torch.device(os.environ.get("KIMI_LINEAR_SYNTHETIC_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    failed = 0
    for i, spec in enumerate(specs):
        if deadline is not None:
            share = (deadline - time.time()) * spec.share / sum(s.share for s in specs[i:])
            if share < 1.0:
                break
            spec = RunSpec(**{**spec.to_dict(), "wall_s": min(spec.wall_s, share)})
        try:
            train_one(spec, device, lambda rec: append_record(curves, rec))
        except Exception as e:  # recorded, so the table says which run failed and why
            traceback.print_exc()
            append_record(curves, {"task": spec.task, "mixer": spec.mixer, "seq_len": spec.seq_len, "event": "error",
                                   "error": f"{type(e).__name__}: {e}"})
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

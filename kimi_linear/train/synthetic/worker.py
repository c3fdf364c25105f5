"""A worker process of `kimi-linear synthetic`: `python -m kimi_linear.train.synthetic.worker SPEC_JSON CURVES`.

Runs one `RunSpec` (train_one.py) and appends each evaluation record to CURVES as one JSON line, written with a
single `write` on a file opened for appending (so records of workers sharing the file never interleave), and
flushed at once: a worker killed mid-run leaves every point it measured. A failure is recorded as a line with
`"event": "error"` and its message, and the worker exits 1.
"""

from __future__ import annotations

import json
import os
import sys
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

    spec_json, curves = (argv if argv is not None else sys.argv[1:])[:2]
    from kimi_linear.train.synthetic.train_one import RunSpec, train_one

    spec = RunSpec(**json.loads(spec_json))
    torch.set_num_threads(int(os.environ.get("KIMI_LINEAR_SYNTHETIC_THREADS", "1")))
    device = torch.device(os.environ.get("KIMI_LINEAR_SYNTHETIC_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        train_one(spec, device, lambda rec: append_record(curves, rec))
    except Exception as e:  # recorded, so the table says which run failed and why
        traceback.print_exc()
        append_record(curves, {"task": spec.task, "mixer": spec.mixer, "seq_len": spec.seq_len, "event": "error",
                               "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

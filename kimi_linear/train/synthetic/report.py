"""The synthetic suite's table: best answer accuracy per task x length x mixer, with the report's numbers beside.

`load_curves(path)` reads the workers' records (curves.jsonl); `summarize(records)` gives, per run, the best
accuracy, the step it was reached, the steps trained and the wall-clock seconds, and any error;
`write_report(records, out_dir, command)` writes results.json and results.md (the markdown table: ours
and the report's, per length, one row per task and mixer).
"""

from __future__ import annotations

import json
import os

from kimi_linear.train.synthetic.reference import AT_1024, reference

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def load_curves(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def summarize(records: list[dict]) -> dict[tuple[str, str, int], dict]:
    runs: dict[tuple[str, str, int], dict] = {}
    for r in records:
        key = (r["task"], r["mixer"], int(r["seq_len"]))
        run = runs.setdefault(key, {"best_acc": None, "best_step": None, "steps": 0, "elapsed_s": 0.0,
                                    "points": [], "error": None, "solved": False})
        if r.get("event") == "error":
            run["error"] = r.get("error")
            continue
        run["points"].append((r["step"], r["acc"]))
        run["steps"] = max(run["steps"], r["step"])
        run["elapsed_s"] = max(run["elapsed_s"], r.get("elapsed_s", 0.0))
        run["solved"] |= r.get("event") == "solved"
        run["diverged"] = run.get("diverged", False) or r.get("event") == "diverged"
        if run["best_acc"] is None or r["acc"] > run["best_acc"]:
            run["best_acc"], run["best_step"] = r["acc"], r["step"]
        for k in ("batch", "lr"):
            run[k] = r.get(k)
    for run in runs.values():
        run["points"].sort()
    return runs


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_table(runs: dict, lengths: list[int]) -> str:
    tasks = sorted({k[0] for k in runs}, key=["palindrome", "mqar", "stack"].index)
    mixers = [m for m in ("kda", "gdn", "mla") if any(k[1] == m for k in runs)]
    head = "| task | mixer | " + " | ".join(f"{n} ours / report" for n in lengths) + " | steps (at the best, of trained) |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for t in tasks:
        for m in mixers:
            cells, steps = [], []
            for n in lengths:
                run = runs.get((t, m, n))
                ours = None if run is None or run["best_acc"] is None else 100 * run["best_acc"]
                mark = "" if run is None or not run["error"] else " (error)"
                cells.append(f"{_cell(ours)}{mark} / {_cell(reference(t, m, n))}")
                steps.append("-" if run is None or run["best_step"] is None else f"{run['best_step']}/{run['steps']}")
            lines.append(f"| {t} | {m} | " + " | ".join(cells) + f" | {', '.join(steps)} |")
    return "\n".join(lines)


def write_report(records: list[dict], out_dir: str, command: str | None = None, device: str | None = None) -> dict:
    runs = summarize(records)
    lengths = sorted({k[2] for k in runs})
    os.makedirs(out_dir, exist_ok=True)
    payload = {
        "command": command, "device": device, "lengths": lengths,
        "runs": [{"task": t, "mixer": m, "seq_len": n, "best_acc": r["best_acc"], "best_step": r["best_step"],
                  "steps": r["steps"], "elapsed_s": r["elapsed_s"], "solved": r["solved"], "error": r["error"],
                  "batch": r.get("batch"), "lr": r.get("lr"), "report_best_acc": reference(t, m, n),
                  "curve": r["points"]}
                 for (t, m, n), r in sorted(runs.items())],
        "report_at_1024": {t: {m: {"acc": a, "steps": s} for m, (a, s) in v.items()} for t, v in AT_1024.items()},
    }
    with open(os.path.join(out_dir, RESULTS_JSON), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    md = ["# Synthetic tasks: best answer-token accuracy (%), ours / the Kimi Linear report's", ""]
    if command:
        md += [f"Made by `{command}`" + (f" on {device}." if device else "."), ""]
    md += [markdown_table(runs, lengths), "",
           "Report at length 1024: " + "; ".join(
               f"{t} KDA {v['kda'][0]}% after {v['kda'][1]} steps, GDN {v['gdn'][0]}% after {v['gdn'][1]}"
               for t, v in AT_1024.items()) + "."]
    with open(os.path.join(out_dir, RESULTS_MD), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return payload

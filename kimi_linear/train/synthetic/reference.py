"""The Kimi Linear technical report's synthetic-task numbers (Figure 4), as issue 18 quotes them.

`BEST[task][mixer][seq_len]`: the best answer accuracy (%) of the 2-layer models; `AT_1024[task][mixer]`:
(accuracy %, training steps) that the report gives for length 1024. The report has no full-attention numbers
for these tasks, so "mla" has none.
"""

BEST = {
    "palindrome": {"kda": {256: 100, 512: 100, 1024: 100, 2048: 42.2}, "gdn": {256: 100, 512: 100, 1024: 97.0, 2048: 37.1}},
    "mqar": {"kda": {256: 100, 512: 100, 1024: 100, 2048: 47.6}, "gdn": {256: 100, 512: 100, 1024: 78.7, 2048: 29.1}},
    "stack": {"kda": {256: 100, 512: 100, 1024: 100, 2048: 100}, "gdn": {256: 100, 512: 100, 1024: 100, 2048: 100}},
}

AT_1024 = {
    "palindrome": {"kda": (94.2, 4000), "gdn": (30.0, 8000)},
    "mqar": {"kda": (93.4, 2000), "gdn": (78.7, 20000)},
    "stack": {"kda": (98.2, 4000), "gdn": (94.4, 6000)},
}


def reference(task: str, mixer: str, seq_len: int) -> float | None:
    return BEST.get(task, {}).get(mixer, {}).get(seq_len)

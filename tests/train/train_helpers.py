"""Helpers of the training tests: jsonl writing and small generated corpora."""

from __future__ import annotations

import json


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def repetitive_texts(n: int = 48) -> list[dict]:
    """A repetitive corpus a tiny model learns in a few dozen steps."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        out.append({"text": f"the {a} {b} sat on the {a} mat."})
    return out


def chats(n: int = 16) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"count to {i % 5 + 2}"},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(1, i % 5 + 3))}]}
            for i in range(n)]

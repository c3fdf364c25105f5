"""`kimi-linear synthetic`: each task generator's exact semantics (checked against a plain re-derivation from the
tokens), determinism, and the pipeline end to end (--quick in-process, and one run through a worker process)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kimi_linear.train.synthetic.tasks import IGNORE, MQAR, Palindrome, Stack


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_palindrome_is_the_reversed_half_after_the_separator():
    task = Palindrome(num_symbols=7)
    x, y = task.generate(5, 12, _gen())
    assert x.shape == y.shape == (5, 12)
    n = 6
    for b in range(5):
        first = x[b, :n].tolist()
        assert all(task.FIRST_SYMBOL <= s < task.vocab_size for s in first)
        assert x[b, n].item() == task.SEP
        full = first + [task.SEP] + first[::-1]
        assert x[b].tolist() == full[:-1]
        assert (y[b, :n] == IGNORE).all()
        assert y[b, n:].tolist() == first[::-1]  # from the separator on: the symbols in reverse order


def test_mqar_queries_each_key_once_and_answers_its_value():
    task = MQAR(vocab=64, num_kv_pairs=4)
    x, y = task.generate(6, 40, _gen(1))
    half = 32
    for b in range(6):
        ids = x[b].tolist()
        keys, values = ids[0:8:2], ids[1:8:2]
        assert len(set(keys)) == 4 and len(set(values)) == 4
        assert all(1 <= k < half for k in keys) and all(half <= v < 64 for v in values)
        pairs = dict(zip(keys, values))
        answers = [(t, v) for t, v in enumerate(y[b].tolist()) if v != IGNORE]
        assert len(answers) == 4
        asked = set()
        for t, v in answers:
            assert t >= 8 and (t - 8) % 2 == 0  # queries sit at even offsets after the pairs
            assert ids[t] in pairs and pairs[ids[t]] == v  # the answer is the queried key's value
            asked.add(ids[t])
        assert asked == set(keys)


def test_mqar_default_pairs_grow_with_length():
    task = MQAR()
    assert task.pairs(256) == 16 and task.pairs(2048) == 128
    with pytest.raises(ValueError, match="key-value pairs"):
        MQAR(num_kv_pairs=10).generate(1, 32, _gen())


def test_stack_answers_are_the_tops_of_the_popped_stacks():
    task = Stack(num_stacks=3, num_values=5, pop_prob=0.6)
    x, y = task.generate(8, 64, _gen(2))
    S = task.num_stacks
    for b in range(8):
        stacks = [[] for _ in range(S)]
        ids, labels = x[b].tolist(), y[b].tolist()
        num_pops = 0
        for t in range(0, 64, 2):
            op, val = ids[t], ids[t + 1] - 2 * S
            assert 0 <= op < 2 * S and 0 <= val < task.num_values
            assert labels[t + 1] == IGNORE
            if op < S:  # PUSH_op val
                stacks[op].append(val)
                assert labels[t] == IGNORE
            else:  # POP_s: the stack is not empty and its top is both the next token and the answer
                s = op - S
                assert stacks[s], "a pop from an empty stack"
                top = stacks[s].pop()
                assert val == top and labels[t] == task.value_token(top)
                num_pops += 1
        assert num_pops == sum(v != IGNORE for v in labels)


@pytest.mark.parametrize("task", [Palindrome(), MQAR(), Stack()], ids=lambda t: t.name)
def test_generators_are_deterministic_and_in_vocabulary(task):
    a = task.generate(4, 64, _gen(3))
    b = task.generate(4, 64, _gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].min() >= 0 and a[0].max() < task.vocab_size
    assert ((a[1] == IGNORE) | ((a[1] >= 0) & (a[1] < task.vocab_size))).all()
    assert (a[1] != IGNORE).any()


def test_quick_pipeline_end_to_end(tmp_path):
    from kimi_linear.cli.main import main

    out = tmp_path / "synthetic"
    assert main(["synthetic", "--quick", "--lengths", "16", "--out", str(out), "--curves-length", "16"]) == 0
    payload = json.loads((out / "results.json").read_text())
    runs = {(r["task"], r["mixer"], r["seq_len"]): r for r in payload["runs"]}
    assert set(runs) == {(t, m, 16) for t in ("palindrome", "mqar", "stack") for m in ("kda", "gdn", "mla")}
    for r in runs.values():
        assert r["error"] is None and 0.0 <= r["best_acc"] <= 1.0 and r["steps"] == 2 and r["curve"]
    md = (out / "results.md").read_text()
    assert "| mqar | kda |" in md and "ours / report" in md
    assert (out / "table.png").stat().st_size > 0 and (out / "curves_16.png").stat().st_size > 0
    # --report-from re-renders from the curves alone
    again = tmp_path / "again"
    assert main(["synthetic", "--report-from", str(out / "curves.jsonl"), "--out", str(again),
                 "--curves-length", "16"]) == 0
    assert json.loads((again / "results.json").read_text())["runs"] == payload["runs"]


def test_worker_process_writes_partial_results(tmp_path):
    from kimi_linear.train.synthetic.run import plan, run_suite

    specs = plan(["mqar"], [16], ["gdn"], steps=2, eval_every=1, eval_sequences=4, batch_tokens=64, min_batch=4,
                 hidden_size=64, warmup_steps=1)
    curves = run_suite(specs, str(tmp_path), workers=1, budget_s=120, device="cpu", warmup=False)
    records = [json.loads(line) for line in open(curves)]
    assert [r["step"] for r in records] == [1, 2]  # one line per evaluation, as measured
    assert all(r["task"] == "mqar" and r["mixer"] == "gdn" and r["seq_len"] == 16 for r in records)


def test_bad_flags_name_the_flag(capsys):
    from kimi_linear.cli.main import main

    assert main(["synthetic", "--tasks", "sorting", "--out", os.devnull]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["synthetic", "--lengths", "15"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["synthetic", "--mqar-vocab", "64"]) == 2  # 31 keys for 128 pairs at length 2048
    assert "--mqar-vocab" in capsys.readouterr().err
    assert main(["synthetic", "--tasks", "mqar", "--lengths", "16384"]) == 2  # the default 1024: 511 keys < 1024 pairs
    assert "1024 holds too few distinct keys" in capsys.readouterr().err
    assert main(["synthetic", "--tasks", "mqar", "--mqar-pairs", "0"]) == 2
    assert "--mqar-pairs" in capsys.readouterr().err
    assert main(["synthetic", "--tasks", "mqar", "--lengths", "64,256", "--mqar-pairs", "32"]) == 2  # 128 > 64
    assert "need every length >= 128" in capsys.readouterr().err
    assert main(["synthetic", "--shares", "sorting=2"]) == 2
    assert "--shares" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synthetic", "--shares", "mqar=-1"])
    assert "--shares" in capsys.readouterr().err


def test_shares_weigh_the_runs_and_balance_the_lanes():
    from kimi_linear.train.synthetic.cli import _shares
    from kimi_linear.train.synthetic.run import lanes, plan

    shares = _shares("mqar=3,mla=0.5")
    specs = plan(["mqar", "stack"], [32, 16], ["kda", "mla"], shares=shares)
    assert {(s.task, s.mixer): s.share for s in specs} == {("mqar", "kda"): 3.0, ("mqar", "mla"): 1.5,
                                                           ("stack", "kda"): 1.0, ("stack", "mla"): 0.5}
    dealt = lanes(specs, 2)
    assert sorted(s.key for lane in dealt for s in lane) == sorted(s.key for s in specs)
    weights = [sum(s.share for s in lane) for lane in dealt]
    assert abs(weights[0] - weights[1]) <= max(s.share for s in specs)  # greedy balance
    assert len(lanes(specs, 20)) == len(specs)


def test_a_run_gets_its_share_of_the_lane_time(tmp_path, monkeypatch):
    """worker.main: wall_s = time left x share / the shares of the runs not yet started."""
    import time

    from kimi_linear.train.synthetic import worker
    from kimi_linear.train.synthetic.run import plan

    seen = []
    monkeypatch.setattr("kimi_linear.train.synthetic.train_one.train_one",
                        lambda spec, device, sink: seen.append(spec.wall_s))
    specs = plan(["mqar", "stack"], [16], ["kda"], shares={"mqar": 3.0}, wall_s=1e9)
    assert worker.main([json.dumps([s.to_dict() for s in specs]), str(tmp_path / "c.jsonl"),
                        repr(time.time() + 400)]) == 0
    # the first run took no time: what it left goes to the second
    assert seen[0] == pytest.approx(300, abs=2) and seen[1] == pytest.approx(400, abs=2)


@pytest.mark.parametrize("mixer", ["kda", "mla"])
def test_training_starts_near_the_uniform_loss(mixer):
    """The training init (models.small_init): the first loss is about ln(vocab). The kernel-test init it
    replaces (lm_head gain 3) started MQAR at 10.9 against ln 1024 = 6.9, and its first ~150 steps went to
    undoing that."""
    import math

    from kimi_linear.train.synthetic.train_one import RunSpec, Trainer

    task = MQAR()
    spec = RunSpec(task="mqar", mixer=mixer, seq_len=32, batch_tokens=128, min_batch=4, hidden_size=64)
    trainer = Trainer(spec, torch.device("cpu"), task.vocab_size)
    loss = trainer.step(*task.generate(spec.batch, spec.seq_len, _gen(4)))
    assert loss.dim() == 0 and abs(loss.item() - math.log(task.vocab_size)) < 0.5


def test_trainer_never_decays_the_embeddings():
    from kimi_linear.train.synthetic.train_one import RunSpec, Trainer

    spec = RunSpec(task="mqar", mixer="gdn", seq_len=32, hidden_size=64, weight_decay=0.1)
    trainer = Trainer(spec, torch.device("cpu"), 64)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "model.embed_tokens.weight" not in decayed and "lm_head.weight" not in decayed
    assert any(n.endswith("q_proj.weight") for n in decayed)


def test_a_lane_runs_its_specs_in_turn(tmp_path):
    from kimi_linear.train.synthetic.run import plan
    from kimi_linear.train.synthetic.worker import main

    specs = plan(["palindrome", "stack"], [16], ["mla"], steps=2, eval_every=2, eval_sequences=4, batch_tokens=64,
                 min_batch=4, hidden_size=64, warmup_steps=1)
    curves = tmp_path / "curves.jsonl"
    import time

    assert main([json.dumps([s.to_dict() for s in specs]), str(curves), repr(time.time() + 100)]) == 0
    records = [json.loads(line) for line in open(curves)]
    assert [(r["task"], r["step"]) for r in records] == [("palindrome", 2), ("stack", 2)]


def test_mqar_vocab_reaches_the_run(tmp_path):
    """1024 tokens by default (the committed table's); --mqar-vocab (RunSpec.mqar_vocab) sets another."""
    from kimi_linear.train.synthetic.tasks import make_task

    assert MQAR().vocab_size == 1024 and make_task("mqar").vocab_size == 1024
    assert make_task("mqar", 8192).vocab_size == 8192 and make_task("stack", 1024).vocab_size == Stack().vocab_size
    from kimi_linear.cli.main import main

    out = tmp_path / "s"
    assert main(["synthetic", "--quick", "--tasks", "mqar", "--mixers", "gdn", "--lengths", "16", "--mqar-vocab",
                 "256", "--out", str(out), "--curves-length", "16"]) == 0
    assert {json.loads(line)["vocab"] for line in open(out / "curves.jsonl")} == {256}


def test_mqar_pairs_reach_the_run(tmp_path):
    """--mqar-pairs fixes MQAR's key-value pairs at every length (RunSpec.mqar_pairs); the records name them."""
    from kimi_linear.train.synthetic.tasks import make_task

    assert make_task("mqar").pairs(1024) == 64 and make_task("mqar", None, 16).pairs(1024) == 16
    ids, labels = make_task("mqar", 256, 3).generate(2, 32, torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(dim=1) == 3).all()  # one answer per pair
    from kimi_linear.cli.main import main

    out = tmp_path / "s"
    assert main(["synthetic", "--quick", "--tasks", "mqar", "--mixers", "gdn", "--lengths", "16,32", "--mqar-pairs",
                 "2", "--out", str(out), "--curves-length", "16"]) == 0
    assert {json.loads(line)["kv_pairs"] for line in open(out / "curves.jsonl")} == {2}

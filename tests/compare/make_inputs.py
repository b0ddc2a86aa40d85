#!/usr/bin/env python3
"""Writes the fixed 200-line `arbiter score` input of the behaviour comparison (scripts/compare-outputs.sh).

Deterministic (seeded): conversations, pre-templated text, token ids, lines with their own truncation
policy and reward weights, inputs longer than the comparison's --max-input-tokens 256 (refused or
truncated), and malformed lines of every kind `arbiter score` reports. Usage: make_inputs.py OUT [N]
"""
import json
import random
import sys

WORDS = ("the reward model reads every turn of a conversation and scores the final answer for helpfulness "
         "correctness coherence complexity and verbosity while trainers wait for numbers they can trust "
         "über naïve 数据 🙂 tabs\tand  double  spaces").split(" ")
ATTRS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversation(rng, turns, long=False):
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": words(rng, 3, 12)})
    for t in range(turns):
        size = (60, 120) if long else (2, 30)
        msgs.append({"role": "user", "content": words(rng, *size)})
        msgs.append({"role": "assistant", "content": words(rng, *size)})
    return msgs


def good_line(rng, i):
    kind = rng.choice(["messages", "messages", "text", "token_ids"])
    obj = {}
    if rng.random() < 0.5:
        obj["id"] = rng.choice([i, f"ex-{i}", {"k": i}])
    long = rng.random() < 0.15
    if kind == "messages":
        obj["messages"] = conversation(rng, rng.randint(1, 4 if long else 3), long)
    elif kind == "text":
        obj["text"] = words(rng, 300, 400) if long else words(rng, 1, 80)
    else:
        obj["token_ids"] = [rng.randrange(0, 2048) for _ in range(rng.randint(300, 400) if long else rng.randint(1, 120))]
    if long or rng.random() < 0.1:
        obj["truncation"] = rng.choice(["truncate", "truncate", "error"])
    if rng.random() < 0.2:
        obj["reward_weights"] = {rng.choice(ATTRS): round(rng.uniform(-1, 1), 3)}
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


BAD = [
    "not json at all",
    "[1, 2, 3]",
    "{}",
    '{"text": "a", "token_ids": [1]}',
    '{"token_ids": [1, -3]}',
    '{"token_ids": [1, 2048]}',
    '{"token_ids": []}',
    '{"messages": [{"role": "robot", "content": "x"}]}',
    '{"messages": [{"role": "user"}]}',
    '{"messages": []}',
    '{"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}]}',
    '{"text": "a", "truncation": "cut"}',
    '{"text": "a", "colour": 1}',
    '{"text": "a", "reward_weights": {"nonsense": 1}}',
    '{"text": "a", "reward_weights": {"helpfulness": "high"}}',
    '{"text": ""}',
    '{"text": 5}',
]


def main():
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rng = random.Random(20261130)
    lines = []
    for i in range(n):
        r = rng.random()
        if r < 0.12:
            lines.append(rng.choice(BAD))
        elif r < 0.14:
            lines.append("")  # blank lines are skipped but keep their line numbers
        else:
            lines.append(good_line(rng, i))
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

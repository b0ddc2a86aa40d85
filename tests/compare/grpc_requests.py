#!/usr/bin/env python3
"""Sends a fixed set of Score, Rank and ScoreStream requests (good and bad) to a running arbiter
and prints every answer, one line each: the response as JSON with the timing fields cleared (they
are wall-clock times), or the status code and message. Two servers that behave the same print the
same bytes. Usage: grpc_requests.py HOST:PORT (needs clients/python installed)."""
import json
import random
import sys
import time

import grpc
from google.protobuf import json_format

from arbiter_client._gen import arbiter_pb2 as pb
from arbiter_client._gen import arbiter_pb2_grpc as pb_grpc

WORDS = "reward models read conversations and score answers for trainers who need numbers fast über 数据 🙂".split()


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conv(rng, turns, size=(2, 25)):
    msgs = [pb.Message(role="system", content=text(rng, 2, 8))] if rng.random() < 0.3 else []
    for _ in range(turns):
        msgs.append(pb.Message(role="user", content=text(rng, *size)))
        msgs.append(pb.Message(role="assistant", content=text(rng, *size)))
    return msgs


def item(rng):
    k = rng.random()
    if k < 0.5:
        return pb.Item(conversation=pb.Conversation(messages=conv(rng, rng.randint(1, 3))))
    if k < 0.75:
        return pb.Item(text=text(rng, 1, 60))
    return pb.Item(token_ids=pb.TokenIds(ids=[rng.randrange(2048) for _ in range(rng.randint(1, 100))]))


def requests(rng):
    """(rpc, request) pairs in a fixed order."""
    out = []
    for n in (1, 3, 8, 20):
        out.append(("Score", pb.ScoreRequest(items=[item(rng) for _ in range(n)])))
    out.append(("Score", pb.ScoreRequest(items=[item(rng) for _ in range(4)], reward_weights={"verbosity": 1.5})))
    long_conv = pb.Item(conversation=pb.Conversation(messages=conv(rng, 5, (40, 60))))
    long_text = pb.Item(text=text(rng, 300, 350))
    out.append(("Score", pb.ScoreRequest(items=[long_conv, long_text], truncation=pb.TRUNCATION_TRUNCATE)))
    out.append(("Score", pb.ScoreRequest(items=[item(rng), long_text], truncation=pb.TRUNCATION_ERROR)))
    out.append(("Score", pb.ScoreRequest(items=[])))
    out.append(("Score", pb.ScoreRequest(items=[item(rng), pb.Item()])))
    bad_role = pb.Item(conversation=pb.Conversation(messages=[pb.Message(role="robot", content="x")]))
    out.append(("Score", pb.ScoreRequest(items=[item(rng), bad_role])))
    out.append(("Score", pb.ScoreRequest(items=[pb.Item(token_ids=pb.TokenIds(ids=[1, 5000]))])))
    out.append(("Score", pb.ScoreRequest(items=[item(rng)], reward_weights={"nonsense": 1.0})))
    out.append(("Score", pb.ScoreRequest(items=[item(rng)], truncation=7)))
    for n in (1, 2, 5, 12):
        prompt = conv(rng, rng.randint(0, 2))[:-1] if rng.random() < 0.5 else [pb.Message(role="user", content=text(rng, 3, 30))]
        if not prompt or prompt[-1].role != "user":
            prompt.append(pb.Message(role="user", content=text(rng, 3, 30)))
        cands = [text(rng, 1, 40) for _ in range(n)]
        if n == 5:
            cands[3] = cands[1]  # a tie keeps input order
        out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=prompt), candidates=cands)))
    out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=[pb.Message(role="user", content="q")]),
                                       candidates=["a", "b"], reward_weights={"helpfulness": -2.0})))
    out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=conv(rng, 1)), candidates=["a"])))
    out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=[]), candidates=["a"])))
    out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=[pb.Message(role="user", content="q")]), candidates=[])))
    out.append(("Rank", pb.RankRequest(prompt=pb.Conversation(messages=[pb.Message(role="user", content=text(rng, 400, 450))]),
                                       candidates=["a", "b"], truncation=pb.TRUNCATION_TRUNCATE)))
    return out


def dump(msg):
    msg = type(msg).FromString(msg.SerializeToString())
    if msg.HasField("timing"):
        msg.ClearField("timing")
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=None, sort_keys=True)


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    stub = pb_grpc.RewardServiceStub(channel)
    deadline = time.monotonic() + 300
    while True:  # UNAVAILABLE (or no listener yet) until the model is loaded and warmed up
        try:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            break
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"the server at {sys.argv[1]} did not become ready: {e.code().name}")
            time.sleep(0.1)
    rng = random.Random(7)
    reqs = requests(rng)
    for i, (rpc, req) in enumerate(reqs):
        try:
            resp = getattr(stub, rpc)(req, timeout=120)
            print(f"{i} {rpc} OK {dump(resp)}")
        except grpc.RpcError as e:
            print(f"{i} {rpc} {e.code().name} {e.details()}")
    # The same Score requests again, as one stream (answers may come in any order: sort by id).
    stream = [pb.ScoreStreamRequest(request_id=f"s{i}", request=req) for i, (rpc, req) in enumerate(reqs) if rpc == "Score"]
    stream.append(pb.ScoreStreamRequest(request_id="empty"))
    answers = {}
    for a in stub.ScoreStream(iter(stream), timeout=300):
        if a.HasField("response"):
            answers[a.request_id] = "OK " + dump(a.response)
        else:
            answers[a.request_id] = f"ERROR {a.error.code} {a.error.message}"
    for k in sorted(answers):
        print(f"stream {k} {answers[k]}")
    print(f"stream answers {len(answers)} of {len(stream)}")


if __name__ == "__main__":
    main()

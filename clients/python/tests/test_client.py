"""Sync and asyncio clients against a real server: scores equal `arbiter score` exactly."""
import asyncio
import subprocess

import grpc
import pytest

from arbiter_client import ArbiterError, AsyncClient, Client

from conftest import CONVERSATIONS, Server


def as_pairs(results):
    return [(r.reward, r.attributes) for r in results]


def test_sync_score_equals_arbiter_score(server, reference):
    with Client(server.addr) as c:
        with pytest.warns(UserWarning, match="meaningless"):
            results = c.score(CONVERSATIONS)
    assert as_pairs(results) == reference
    assert all(r.tokens > 0 and not r.truncation.truncated for r in results)
    assert list(results[0].attributes) and set(results[0].attributes) == {
        "helpfulness", "correctness", "coherence", "complexity", "verbosity"}


def test_item_kinds_and_weights(server):
    with Client(server.addr) as c:
        text, ids = c.tokenize(CONVERSATIONS[0])
        a, b, d = c.score([{"messages": CONVERSATIONS[0]}, {"text": text}, {"token_ids": ids}])
        assert a == b == d
        # Every truncation policy by name; an input under the limit is scored the same under each.
        for policy in ("error", "truncate", "truncate_content"):
            assert c.score([CONVERSATIONS[0]], truncation=policy)[0] == a
        with pytest.raises(ValueError, match="'truncate_content'"):
            c.score([CONVERSATIONS[0]], truncation="cut")
        w = c.score([CONVERSATIONS[0]], reward_weights={"verbosity": 1.0})[0]
        info = c.model_info()
        weights = dict(info.default_reward_weights, verbosity=1.0)
        expected = sum(weights[k] * v for k, v in a.attributes.items())
        assert w.reward == pytest.approx(expected, rel=1e-5)
        assert w.attributes == a.attributes


def test_per_turn_scores_every_assistant_turn_as_its_stopped_conversation(server):
    conv = [{"role": "system", "content": "Be brief."}]
    for t in range(3):
        conv += [{"role": "user", "content": f"Count to {t + 1}."},
                 {"role": "assistant", "content": " ".join(str(k + 1) for k in range(t + 1))}]
    stopped = [conv[:i + 1] for i, m in enumerate(conv) if m["role"] == "assistant"]
    with Client(server.addr) as c:
        whole, plain = c.score([conv], per_turn=True)[0], c.score([conv])[0]
        alone = c.score(stopped)
        got = dict(c.stream([("a", [conv])], per_turn=True))["a"][0]
        with pytest.raises(ArbiterError, match=r"items\[0\].*per_turn"):
            c.score([{"text": "hi"}], per_turn=True)
    assert [t.message_index for t in whole.turns] == [2, 4, 6]
    assert [(t.reward, t.attributes, t.tokens) for t in whole.turns] == [(a.reward, a.attributes, a.tokens) for a in alone]
    assert all(t.scored and t.on_spine for t in whole.turns)
    assert plain.turns == [] and (plain.reward, plain.attributes) == (whole.reward, whole.attributes)
    assert got == whole

    async def run():
        async with AsyncClient(server.addr) as c:
            return (await c.score([conv], per_turn=True))[0]
    assert asyncio.run(run()) == whole


def test_rank_scores_each_candidate_as_score_would(server, reference):
    prompt = CONVERSATIONS[2][:-1]
    own = CONVERSATIONS[2][-1]["content"]
    with Client(server.addr) as c:
        r = c.rank(prompt, ["meh", own, "meh"])
    assert (r.results[1].reward, r.results[1].attributes) == reference[2]
    assert r.results[0] == r.results[2]
    assert r.order.index(0) < r.order.index(2), "ties keep input order"
    assert sorted(r.order) == [0, 1, 2]
    rewards = [r.results[i].reward for i in r.order]
    assert rewards == sorted(rewards, reverse=True)


def test_stream_matches_by_id(server, reference):
    with Client(server.addr) as c:
        got = dict(c.stream([(f"r{i}", [conv]) for i, conv in enumerate(CONVERSATIONS)] + [("bad", [])]))
    assert isinstance(got.pop("bad"), ArbiterError)
    assert {k: as_pairs(v)[0] for k, v in got.items()} == {f"r{i}": ref for i, ref in enumerate(reference)}


def test_errors_name_the_problem(server):
    with Client(server.addr, retries=0) as c:
        with pytest.raises(ArbiterError) as e:
            c.score([[{"role": "assistant", "content": "x"}]])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "items[0]: messages[0]: expected a user turn" in e.value.message
        with pytest.raises(ValueError):
            c.score([{"text": "a", "token_ids": [1]}])


def test_deadline(server):
    with Client(server.addr, retries=0) as c:
        with pytest.raises(ArbiterError) as e:
            c.score([{"token_ids": list(range(7, 1500))}] * 16, timeout=0.001)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client(server, reference):
    async def main():
        async with AsyncClient(server.addr) as c:
            results = await c.score(CONVERSATIONS)
            info = await c.model_info()
            ranked = await c.rank(CONVERSATIONS[0][:-1], ["4.", "5."])
            streamed = {k: v async for k, v in c.stream([("a", [CONVERSATIONS[1]])])}
            together = await asyncio.gather(*(c.score([conv]) for conv in CONVERSATIONS))
            return results, info, ranked, streamed, together

    results, info, ranked, streamed, together = asyncio.run(main())
    assert as_pairs(results) == reference
    assert [as_pairs(x)[0] for x in together] == reference
    assert info.architecture == "NemotronForSequenceClassification" and "meaningless" in info.warning
    assert (ranked.results[0].reward, ranked.results[0].attributes) == reference[0]
    assert as_pairs(streamed["a"]) == [reference[1]]


def test_retries_on_resource_exhausted_then_gives_up():
    s = Server("--queue-capacity", "1")
    try:
        s.wait_ready()
        with Client(s.addr, retries=2, backoff=0.01) as c:
            with pytest.raises(ArbiterError) as e:
                c.score([CONVERSATIONS[0], CONVERSATIONS[1]])  # 2 items never fit a queue of 1
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.attempts == 3
            with pytest.raises(ArbiterError) as e:
                c.score([])
            assert e.value.attempts == 1, "INVALID_ARGUMENT is not retried"
    finally:
        s.stop()


def test_bearer_token_and_tls(tmp_path, reference):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    s = Server("--auth-token", "s3cret", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        root = cert.read_bytes()
        s.wait_ready(token="s3cret", root_certificates=root)
        target = f"localhost:{s.port}"
        with Client(target, token="s3cret", root_certificates=root) as c:
            assert as_pairs(c.score(CONVERSATIONS)) == reference
        with Client(target, token="wrong", root_certificates=root, retries=0) as c:
            with pytest.raises(ArbiterError) as e:
                c.model_info()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()

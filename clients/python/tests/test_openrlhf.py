"""OpenRLHF's remote reward protocol, with a plain HTTP client."""
import json
import urllib.error
import urllib.request

from arbiter_client import Client

CHATML_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def post(server, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/get_reward", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rewards_match_scoring_the_split_conversation(server):
    queries = [CHATML_PROMPT + "4.<|im_end|>\n", CHATML_PROMPT + "Five.<|im_end|>"]
    status, body = post(server, {"query": queries, "prompts": [CHATML_PROMPT] * 2, "labels": ["4", "4"]})
    assert status == 200, body
    with Client(server.addr) as c:
        expected = c.score([[{"role": "user", "content": CHATML_PROMPT}, {"role": "assistant", "content": r}]
                            for r in ("4.", "Five.")])
    assert body["rewards"] == [r.reward for r in expected]
    assert body["scores"] == body["rewards"]
    assert "meaningless" in body["warning"]
    assert body["extra_logs"]["helpfulness"] == [r.attributes["helpfulness"] for r in expected]


def test_malformed_requests_get_4xx_with_a_clear_message(server):
    for body, raw, want in [
        (b"{not json", True, "not valid JSON"),
        ({"query": ["a", "b"], "prompts": ["a"]}, False, "\"prompts\" has 1 entries but \"query\" has 2"),
        ({"query": [], "prompts": []}, False, "empty batch"),
        ({"query": ["ab"], "prompts": ["x"]}, False, "query[0] does not start with prompts[0]"),
        ({"query": ["a"], "prompts": ["a"], "labels": [1, 2]}, False, "\"labels\" has 2 entries"),
    ]:
        status, reply = post(server, body, raw)
        assert 400 <= status < 500, (body, status)
        assert want in reply["error"], reply

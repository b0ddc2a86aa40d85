"""OpenRLHF's remote reward protocol, with a plain HTTP client and with OpenRLHF's sharding over
two servers."""
import asyncio
import json
import urllib.error
import urllib.request

import aiohttp

from arbiter_client import Client

from conftest import Server

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
        ({"query": ["ab"], "prompts": ["x"]}, False, "query[0] does not start with prompts[0]"),
        ({"query": ["a"], "prompts": ["a"], "labels": [1, 2]}, False, "\"labels\" has 2 entries"),
    ]:
        status, reply = post(server, body, raw)
        assert 400 <= status < 500, (body, status)
        assert want in reply["error"], reply


async def openrlhf_fetch_rewards(urls, queries, prompts, labels):
    """OpenRLHF's client for several reward servers, reimplemented from
    openrlhf/utils/agent.py (SingleTurnAgentExecutor._fetch_rewards_via_http, OpenRLHF 0.10, where
    `--reward.remote_url` takes the comma-separated URLs) and the same split in
    openrlhf/trainer/ppo_utils/experience_maker.py (get_rewards, 0.6-0.9): server i gets the slice
    [i*k, (i+1)*k) of the batch with k = ceil(n / servers), as {"query", "prompts", "labels"}, all
    posted at once with aiohttp; the answers come back in server order. (Its retries are left out:
    a refused request here should fail the test, not be retried.)"""
    k = (len(queries) + len(urls) - 1) // len(urls)

    async def post(session, url, data):
        async with session.post(url, json=data) as response:
            response.raise_for_status()
            return await response.json()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        return await asyncio.gather(*[
            post(session, url, {"query": queries[i * k:(i + 1) * k], "prompts": prompts[i * k:(i + 1) * k],
                                "labels": labels[i * k:(i + 1) * k]})
            for i, url in enumerate(urls)])


def test_two_servers_behind_openrlhfs_sharding(server):
    second = Server()
    try:
        second.wait_ready()
        urls = [f"http://127.0.0.1:{s.http_port}/get_reward" for s in (server, second)]
        responses = ["4.<|im_end|>", "Four<|im_end|>\n", "5", "It is 4.<|im_end|>", "22"]
        queries = [CHATML_PROMPT + r for r in responses]
        with Client(server.addr) as c:
            expected = c.score([[{"role": "user", "content": CHATML_PROMPT}, {"role": "assistant", "content": r}]
                                for r in ("4.", "Four", "5", "It is 4.", "22")])
        want = [r.reward for r in expected]
        # A rollout batch of 5 over 2 servers: 3 to the first, 2 to the second.
        answers = asyncio.run(openrlhf_fetch_rewards(urls, queries, [CHATML_PROMPT] * 5, ["4"] * 5))
        assert [len(a["rewards"]) for a in answers] == [3, 2]
        assert answers[0]["rewards"] + answers[1]["rewards"] == want
        logs = answers[0]["extra_logs"]["helpfulness"] + answers[1]["extra_logs"]["helpfulness"]
        assert logs == [r.attributes["helpfulness"] for r in expected]
        # OpenRLHF 0.10 asks for one sample at a time: the second server gets empty lists.
        answers = asyncio.run(openrlhf_fetch_rewards(urls, queries[:1], [CHATML_PROMPT], ["4"]))
        assert answers[0]["rewards"] == want[:1]
        assert answers[1]["rewards"] == [] and answers[1]["scores"] == []
    finally:
        second.stop()

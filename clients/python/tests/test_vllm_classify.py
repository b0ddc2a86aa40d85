"""vLLM's classify API on arbiter's HTTP port, driven with the bodies vLLM's protocol defines and
verl's reward code sends, checked against the same inputs scored over gRPC.

Sources the bodies follow field for field (read, not copied):
- vLLM `vllm/entrypoints/pooling/classify/protocol.py` (ClassificationCompletionRequest,
  ClassificationChatRequest, ClassificationResponse) and `vllm/entrypoints/pooling/base/protocol.py`
  (PoolingBasicRequestMixin, CompletionRequestMixin, ChatRequestMixin).
- verl `verl/experimental/reward_loop/reward_loop.py`, RewardLoopWorker.compute_score_disrm:
  `{"model": model_name, "input": disrm_prompt, "use_activation": False}` posted to `classify`, reward
  `output["data"][-1]["probs"][-1]`; its docs (docs/advance/reward_loop.rst) show the same call with
  the older `"activation": False`. `disrm_prompt` is the reward model's chat template applied to
  prompt + response, with a leading BOS string removed because vLLM adds BOS itself.
"""
import asyncio
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import pytest

from arbiter_client import Client
from arbiter_client import verl as arbiter_verl

from conftest import BIN, CONVERSATIONS, Server


def http(server, path, body=None, raw=False, headers=None):
    """(status, decoded JSON or None) of a GET (no body) or POST to the server's HTTP port."""
    data = None if body is None else (body if raw else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
            return r.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text else None


def expected_probs(client, results):
    """probs as the issue defines them: the exposed attributes in model order, the reward last."""
    order = client.model_info().attributes
    return [[r.attributes[a] for a in order] + [r.reward] for r in results]


def check_response(body, want_probs, tokens, model):
    assert body["object"] == "list" and body["id"].startswith("classify-") and isinstance(body["created"], int)
    assert body["model"] == model
    assert [d["index"] for d in body["data"]] == list(range(len(want_probs)))
    assert [d["probs"] for d in body["data"]] == want_probs
    for d in body["data"]:
        assert d["num_classes"] == len(d["probs"])
        assert d["label"] in ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "reward")
        assert d["probs"][["helpfulness", "correctness", "coherence", "complexity", "verbosity", "reward"]
                          .index(d["label"])] == max(d["probs"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


def test_completion_request_with_every_field_of_vllms_protocol(server):
    texts = ["<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4\n<extra_id_2>", "plain text, no template"]
    body = {
        # PoolingBasicRequestMixin
        "model": "anything", "user": "u1", "truncate_prompt_tokens": None, "request_id": "req-7",
        "priority": 0, "mm_processor_kwargs": None, "cache_salt": None, "padding": None, "truncation_side": None,
        # CompletionRequestMixin
        "input": texts, "add_special_tokens": True,
        # ClassificationCompletionRequest
        "softmax": None, "activation": None, "use_activation": None,
    }
    status, got = http(server, "/v1/classify", body)
    assert status == 200, got
    with Client(server.addr) as c:
        results = c.score([{"text": t} for t in texts])
        check_response(got, expected_probs(c, results), sum(r.tokens for r in results), "arbiter-demo")
    assert got["id"] == "classify-req-7"
    assert "meaningless" in got["warning"]


def test_every_input_shape_matches_grpc(server):
    text = "<extra_id_1>User\nName a prime.\n<extra_id_1>Assistant\n7\n<extra_id_2>"
    with Client(server.addr) as c:
        _, ids = c.tokenize({"text": text})
        want_text = expected_probs(c, c.score([{"text": text}]))
        want_ids = expected_probs(c, c.score([{"token_ids": ids}, {"token_ids": ids[2:]}]))
    for path, body, want in [
        ("/classify", {"input": text}, want_text),
        ("/classify", {"input": ids}, want_ids[:1]),
        ("/classify", {"input": [ids, ids[2:]]}, want_ids),
    ]:
        status, got = http(server, path, body)
        assert status == 200, got
        assert [d["probs"] for d in got["data"]] == want, body


def test_chat_request_scores_the_conversation_with_the_models_template(server, reference):
    body = {
        # PoolingBasicRequestMixin + ChatRequestMixin + ClassificationChatRequest
        "model": "anything", "user": None, "truncate_prompt_tokens": None, "priority": 0,
        "messages": CONVERSATIONS[1], "add_generation_prompt": False, "continue_final_message": False,
        "add_special_tokens": False, "chat_template": None, "chat_template_kwargs": None,
        "mm_processor_kwargs": None, "softmax": None, "activation": None, "use_activation": False,
    }
    status, got = http(server, "/classify", body)
    assert status == 200, got
    with Client(server.addr) as c:
        results = c.score([CONVERSATIONS[1]])
        check_response(got, expected_probs(c, results), results[0].tokens, "arbiter-demo")
    # The reward, where verl reads it, is what `arbiter score` gives for the conversation.
    assert got["data"][-1]["probs"][-1] == reference[1][0]


@pytest.mark.parametrize("flag", ["use_activation", "activation"])
def test_verls_disrm_request_reads_the_reward_at_the_last_prob(server, flag):
    with Client(server.addr) as c:
        for conv in CONVERSATIONS:
            # verl applies the reward model's template itself and strips a leading BOS string
            # (the demo template adds none); the demo model's template is what Tokenize renders.
            disrm_prompt, _ = c.tokenize(conv)
            status, got = http(server, "/classify", {"model": "/models/rm", "input": disrm_prompt, flag: False})
            assert status == 200, got
            [result] = c.score([conv])
            assert got["data"][-1]["probs"][-1] == result.reward
            assert got["data"][-1]["probs"] == expected_probs(c, [result])[0]


def test_the_verl_reward_function_scores_prompt_and_response(server):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    reward = asyncio.run(arbiter_verl.compute_score(
        "some_dataset", "7", "7", {"prompt": prompt}, arbiter_url=f"http://127.0.0.1:{server.http_port}"))
    question = asyncio.run(arbiter_verl.compute_score(
        "some_dataset", "4", None, {"question": "What is 2+2?"}, arbiter_url=f"http://127.0.0.1:{server.http_port}"))
    with Client(server.addr) as c:
        want = c.score([prompt + [{"role": "assistant", "content": "7"}],
                        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]])
    assert (reward, question) == (want[0].reward, want[1].reward)
    with pytest.raises(ValueError, match="needs the prompt"):
        asyncio.run(arbiter_verl.compute_score("d", "x", None, {}, arbiter_url="http://127.0.0.1:1"))


def test_bad_bodies_get_400_naming_the_field(server):
    for body, raw, param, want in [
        (b"{not json", True, "body", "not valid JSON"),
        ({"model": "m"}, False, "input", "missing"),
        ({"input": ["a", 2]}, False, "input[1]", "must be a string"),
        ({"input": [[1, 2], [3, -1]]}, False, "input[1][1]", "must be a token id"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, False,
         "messages[1].role", "unknown role"),
        ({"messages": [{"role": "user", "content": 5}]}, False, "messages[0].content", "a string or a list"),
        ({"input": "x", "truncate_prompt_tokens": 3}, False, "truncate_prompt_tokens", "below the model's input limit"),
        # Found by the scoring core, named by the item's place in the body.
        ({"input": [[1, 2], [999999]]}, False, "input[1]", "outside the vocabulary"),
        ({"input": ["fine", ""]}, False, "input[1]", "the text is empty"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, False, "messages", ""),
    ]:
        status, reply = http(server, "/classify", body, raw)
        assert status == 400, (body, status, reply)
        err = reply["error"]
        assert err["param"] == param and err["code"] == 400 and err["type"] == "INVALID_ARGUMENT", (body, err)
        assert err["message"].startswith(f"{param}: ") and want in err["message"], (body, err)


def test_models_and_health(server):
    status, got = http(server, "/v1/models")
    assert status == 200, got
    assert got["object"] == "list" and [m["id"] for m in got["data"]] == ["arbiter-demo"]
    with Client(server.addr) as c:
        assert got["data"][0]["max_model_len"] == c.model_info().max_input_tokens
    assert http(server, "/health") == (200, None)


def test_the_bearer_token_applies_as_on_grpc():
    s = Server("--auth-token", "s3cret")
    try:
        s.wait_ready(token="s3cret")
        status, reply = http(s, "/classify", {"input": "x"})
        assert status == 401 and reply["error"]["type"] == "UNAUTHENTICATED", reply
        assert http(s, "/v1/models")[0] == 401
        status, reply = http(s, "/get_reward", {"query": 3})
        assert status == 401, "the token is checked before the body is read"
        status, reply = http(s, "/classify", {"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200, reply
        assert http(s, "/health") == (200, None), "probes need no token"
    finally:
        s.stop()


def test_text_gets_the_bos_the_tokenizer_adds_as_vllm_does():
    """A model whose tokenizer.json post-processor puts BOS (<s>, id 2) in front, as Llama-family
    tokenizers do: vLLM tokenizes `input` text with add_special_tokens=True by default, so BOS
    comes first; add_special_tokens=false leaves the text's own tokens."""
    folder = tempfile.mkdtemp(prefix="arbiter-bos-")
    subprocess.run([BIN, "demo-model", "--out", folder], check=True, capture_output=True)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [2], "tokens": ["<s>"]}},
    }
    with open(path, "w") as f:
        json.dump(tok, f)
    s = Server(model=folder)
    try:
        s.wait_ready()
        text = "<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4\n<extra_id_2>"
        with Client(s.addr) as c:
            _, ids = c.tokenize({"text": text})
            assert ids[0] != 2
            [with_bos, without] = expected_probs(c, c.score([{"token_ids": [2] + ids}, {"text": text}]))
        status, got = http(s, "/classify", {"input": text})
        assert status == 200, got
        assert got["data"][0]["probs"] == with_bos
        assert got["usage"]["prompt_tokens"] == len(ids) + 1
        assert got["model"] == folder, "the served name is --model as given"
        status, got = http(s, "/classify", {"input": text, "add_special_tokens": False})
        assert (status, got["data"][0]["probs"]) == (200, without)
        # Token ids are scored as given, and messages get the template's tokens only.
        assert http(s, "/classify", {"input": ids})[1]["data"][0]["probs"] == without
        conv = CONVERSATIONS[0]
        with Client(s.addr) as c:
            want = expected_probs(c, c.score([conv]))
        assert http(s, "/classify", {"messages": conv})[1]["data"][0]["probs"] == want[0]
    finally:
        s.stop()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)

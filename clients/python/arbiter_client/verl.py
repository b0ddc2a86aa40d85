"""A verl custom reward function that scores with arbiter over vLLM's classify API.

verl's own discriminative-reward path starts a vLLM server of its own; to score with a running
arbiter instead, point verl's custom reward function at this file:

    reward.custom_reward_function.path=$(python -c 'import arbiter_client.verl as m; print(m.__file__)')
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.arbiter_url=http://rm-host:5000

(older verl: ``custom_reward_function.*`` at the top level). ``compute_score`` is a coroutine
function, which verl's reward loop awaits concurrently (verl docs/advance/reward_loop.rst,
"Rule-Based Reward"). It posts ``{"model", "messages": prompt + [assistant: solution_str],
"use_activation": false}`` to ``{arbiter_url}/classify`` and returns ``data[-1].probs[-1]``, the
weighted reward, as verl's own DisRM path reads it (verl/experimental/reward_loop/reward_loop.py,
``compute_score_disrm``). The reward model applies its own chat template to the conversation.

The prompt comes from the sample's ``extra_info``: ``extra_info["prompt"]`` (chat messages or a
string) or ``extra_info["question"]`` (a string, as verl's example datasets store it). Settings:
keyword arguments (verl's ``reward_kwargs``) or the environment: ``ARBITER_URL`` (default
``http://127.0.0.1:5000``), ``ARBITER_TOKEN`` (bearer token, if the server has one),
``ARBITER_TIMEOUT`` (seconds, default 60).
"""
import asyncio
import json
import os
import urllib.error
import urllib.request

__all__ = ["compute_score", "classify", "prompt_messages"]


def prompt_messages(extra_info):
    """The prompt of a verl sample as chat messages, from ``extra_info``."""
    info = extra_info or {}
    prompt = info.get("prompt", info.get("question"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if prompt is not None and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(
        "arbiter_client.verl needs the prompt: put it in the dataset's extra_info as \"prompt\" "
        "(chat messages or a string) or \"question\" (a string)")


def classify(url, body, token=None, timeout=60.0):
    """POSTs ``body`` to ``{url}/classify``; returns the decoded answer or raises RuntimeError
    with the server's error message."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + "/classify", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise RuntimeError(f"arbiter /classify answered HTTP {e.code}: {detail}") from None


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, arbiter_url=None,
                        arbiter_token=None, arbiter_model=None, timeout=None, **_verl_kwargs):
    """verl's custom reward function signature; returns the reward of prompt + ``solution_str``.
    ``data_source`` and ``ground_truth`` are not used: the reward model judges the response."""
    url = arbiter_url or os.environ.get("ARBITER_URL", "http://127.0.0.1:5000")
    token = arbiter_token or os.environ.get("ARBITER_TOKEN")
    seconds = float(timeout or os.environ.get("ARBITER_TIMEOUT", 60))
    messages = prompt_messages(extra_info) + [{"role": "assistant", "content": solution_str}]
    body = {"model": arbiter_model or "arbiter", "messages": messages, "use_activation": False}
    # urllib blocks; a worker thread keeps verl's event loop free for the other samples.
    answer = await asyncio.to_thread(classify, url, body, token, seconds)
    return float(answer["data"][-1]["probs"][-1])

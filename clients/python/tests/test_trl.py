"""The TRL reward functions on conversational and plain-text datasets, called as TRL calls them."""
import asyncio
import inspect
import threading
import warnings

import pytest

from arbiter_client import Client
from arbiter_client.trl import ArbiterReward, async_arbiter_reward

from conftest import CONVERSATIONS, arbiter_score


def test_signature_is_trls():
    params = list(inspect.signature(ArbiterReward.__call__).parameters)
    assert params[:3] == ["self", "prompts", "completions"]
    assert ArbiterReward("localhost:1").__name__ == "arbiter_reward"


def test_conversational_dataset(server, reference):
    prompts = [c[:-1] for c in CONVERSATIONS]
    completions = [[c[-1]] for c in CONVERSATIONS]
    f = ArbiterReward(Client(server.addr), batch_size=3)
    assert f(prompts=prompts, completions=completions, ground_truth=["x"] * 4) == [r for r, _ in reference]


def test_plain_text_dataset_and_weights(server):
    prompts = ["What is 2+2?", "Name a prime."]
    completions = ["4.", "7"]
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
    expected = arbiter_score(convs, ("reward_weights", {"verbosity": 0.0}))
    f = ArbiterReward(server.addr, reward_weights={"verbosity": 0.0})
    assert f(prompts, completions) == [r for r, _ in expected]


def _demo_warning(seen):
    """The demo-model warning among those recorded (gRPC's threads may record others first)."""
    return next(w for w in seen if "meaningless" in str(w.message))


def test_the_demo_warning_names_the_callers_line(server):
    prompts, completions = ["What is 2+2?"], ["4."]
    f = ArbiterReward(server.addr)
    with pytest.warns(UserWarning, match="meaningless") as seen:
        f(prompts, completions)
    assert _demo_warning(seen).filename == __file__, _demo_warning(seen).filename
    with Client(server.addr) as c, pytest.warns(UserWarning, match="meaningless") as seen:
        list(c.stream([("a", [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]])]))
    assert _demo_warning(seen).filename == __file__, [(str(w.message), w.filename) for w in seen]


def test_async_reward_on_trls_background_event_loop(server, reference):
    # Built where TRL builds it: in the main thread, outside any event loop.
    f = async_arbiter_reward(server.addr, batch_size=3)
    # What TRL 1.x checks to tell async reward functions from blocking ones, and logs them under.
    assert asyncio.iscoroutinefunction(f) and f.__name__ == "arbiter_reward"
    # TRL's start_event_loop_in_daemon: a new loop running forever in a daemon thread.
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, name="GRPOTrainer-AsyncRewardLoop", daemon=True)
    thread.start()
    ready.wait()
    prompts = [c[:-1] for c in CONVERSATIONS]
    completions = [[c[-1]] for c in CONVERSATIONS]

    async def all_async_rewards():
        # TRL gathers every async reward function's coroutine on that loop.
        return await asyncio.gather(f(prompts=prompts, completions=completions, ground_truth=["x"] * 4))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):  # each training step calls again on the same loop
                [rewards] = asyncio.run_coroutine_threadsafe(all_async_rewards(), loop).result(timeout=60)
                assert rewards == [r for r, _ in reference]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    # A later call from another loop opens its own channel rather than reusing a dead loop's.
    assert asyncio.run(f(["What is 2+2?"], ["4."])) == [reference[0][0]]

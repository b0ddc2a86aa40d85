"""The TRL reward function on conversational and plain-text datasets."""
import inspect

from arbiter_client import Client
from arbiter_client.trl import ArbiterReward

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

"""Reward functions with TRL's `reward_funcs` signature, backed by an arbiter server.

    from arbiter_client.trl import ArbiterReward, async_arbiter_reward
    trainer = GRPOTrainer(..., reward_funcs=[ArbiterReward("localhost:50051")])
    trainer = GRPOTrainer(..., reward_funcs=[async_arbiter_reward("localhost:50051")])

`ArbiterReward` blocks the training loop while it scores. `async_arbiter_reward` returns a
coroutine function: TRL (1.x) awaits those on its own event loop, in a background thread, together
with its other async reward functions. A grpc.aio channel belongs to the loop it was opened in,
so the function opens its channel on its first call, inside the loop that awaits it (a channel
opened when the trainer is built would be attached to a different loop).

Conversational datasets: `prompts[i]` is a list of messages and `completions[i]` the list of
generated messages (the assistant turn); the scored conversation is their concatenation.
Plain-text datasets: `prompts[i]` becomes the user turn and `completions[i]` the assistant turn.
Each call scores every (prompt, completion) pair exactly as Score would, in batches of
`batch_size` items per request.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, Mapping, Optional, Sequence, Union

from .aio import AsyncClient
from .client import Client


class ArbiterReward:
    """`(prompts, completions, **kwargs) -> list[float]`; rewards with `reward_weights` overriding
    the model's defaults by attribute name (e.g. {"verbosity": 0.0})."""

    def __init__(self, client: Union[Client, str] = "localhost:50051", *, reward_weights: Optional[Mapping[str, float]] = None,
                 batch_size: int = 64, truncation: Optional[str] = "truncate", **client_options: Any):
        self.client = Client(client, **client_options) if isinstance(client, str) else client
        self.reward_weights = dict(reward_weights or {})
        self.batch_size = max(1, int(batch_size))
        self.truncation = truncation
        # TRL logs each reward function under its __name__.
        self.__name__ = "arbiter_reward"

    @staticmethod
    def conversation(prompt: Any, completion: Any) -> List[Mapping[str, str]]:
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                raise ValueError("a plain-text prompt needs a plain-text completion")
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return list(prompt) + list(completion)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> List[float]:
        rewards: List[float] = []
        for batch in _batches(prompts, completions, self.batch_size):
            results = self.client.score(batch, truncation=self.truncation, reward_weights=self.reward_weights)
            rewards.extend(r.reward for r in results)
        return rewards


def _batches(prompts: Sequence[Any], completions: Sequence[Any], batch_size: int) -> List[List[List[Mapping[str, str]]]]:
    """The scored conversations of a TRL call, `batch_size` per request."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    convs = [ArbiterReward.conversation(p, c) for p, c in zip(prompts, completions)]
    return [convs[i:i + batch_size] for i in range(0, len(convs), batch_size)]


def async_arbiter_reward(target: str = "localhost:50051", *, reward_weights: Optional[Mapping[str, float]] = None,
                         batch_size: int = 64, truncation: Optional[str] = "truncate", **client_options: Any
                         ) -> Callable[..., Awaitable[List[float]]]:
    """An async TRL reward function: `await f(prompts, completions, **kwargs) -> list[float]`,
    scoring as `ArbiterReward` does, its batches in flight together. Its `AsyncClient` (with
    `client_options`, see `Client`) is opened on the first call inside the running event loop,
    and again if a later call comes from another loop."""
    weights = dict(reward_weights or {})
    size = max(1, int(batch_size))
    opened: dict = {}

    async def arbiter_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> List[float]:
        loop = asyncio.get_running_loop()
        if opened.get("loop") is not loop:
            opened.update(loop=loop, client=AsyncClient(target, **client_options))
        client = opened["client"]
        batches = _batches(prompts, completions, size)
        results = await asyncio.gather(*(client.score(b, truncation=truncation, reward_weights=weights)
                                         for b in batches))
        return [r.reward for batch in results for r in batch]

    return arbiter_reward

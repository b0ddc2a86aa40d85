"""A reward function with TRL's `reward_funcs` signature, backed by an arbiter server.

    from arbiter_client.trl import ArbiterReward
    trainer = GRPOTrainer(..., reward_funcs=[ArbiterReward("localhost:50051")])

Conversational datasets: `prompts[i]` is a list of messages and `completions[i]` the list of
generated messages (the assistant turn); the scored conversation is their concatenation.
Plain-text datasets: `prompts[i]` becomes the user turn and `completions[i]` the assistant turn.
Each call scores every (prompt, completion) pair exactly as Score would, in batches of
`batch_size` items per request.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Union

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
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        convs = [self.conversation(p, c) for p, c in zip(prompts, completions)]
        rewards: List[float] = []
        for i in range(0, len(convs), self.batch_size):
            results = self.client.score(convs[i:i + self.batch_size], truncation=self.truncation,
                                        reward_weights=self.reward_weights)
            rewards.extend(r.reward for r in results)
        return rewards

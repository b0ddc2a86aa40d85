"""Python clients of arbiter, the reward-model scoring service.

- `Client`: blocking gRPC client (score, rank, stream, model_info, tokenize).
- `AsyncClient`: the same on asyncio.
- `arbiter_client.trl.ArbiterReward`, `arbiter_client.trl.async_arbiter_reward`: TRL reward
  functions, blocking and async.
"""
from .aio import AsyncClient
from .client import Client
from .types import ArbiterError, ModelInfo, RankResult, ScoreResult, Truncation

__all__ = ["AsyncClient", "ArbiterError", "Client", "ModelInfo", "RankResult", "ScoreResult", "Truncation"]

"""asyncio client (grpc.aio), with the same methods as the blocking Client."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import types as t
from ._gen import arbiter_pb2 as pb
from .client import _Base, status_code


class AsyncClient(_Base):
    """Non-blocking client; use inside a running event loop. See `Client` for the options."""

    _grpc = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, method, request, timeout):
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=timeout if timeout is not None else self.timeout,
                                    metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                delay = self._retry_delay(e.code(), attempt)
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
                raise t.ArbiterError(e.code(), e.details() or "", attempt) from None

    async def score(self, items: Sequence[t.ItemLike], *, truncation: Optional[str] = None,
                    reward_weights: Optional[Mapping[str, float]] = None, per_turn: bool = False,
                    timeout: Optional[float] = None) -> List[t.ScoreResult]:
        req = t.score_request(items, truncation, reward_weights, per_turn)
        r = await self._call(self._stub.Score, req, timeout)
        self._warn(r)
        return [t.result(x) for x in r.results]

    async def rank(self, prompt: t.Conversation, candidates: Sequence[str], *, truncation: Optional[str] = None,
                   reward_weights: Optional[Mapping[str, float]] = None,
                   timeout: Optional[float] = None) -> t.RankResult:
        r = await self._call(self._stub.Rank, t.rank_request(prompt, candidates, truncation, reward_weights), timeout)
        self._warn(r)
        return t.RankResult([t.result(x) for x in r.results], list(r.order), r.model_fingerprint)

    async def stream(self, requests: Iterable[Tuple[str, Sequence[t.ItemLike]]], *, truncation: Optional[str] = None,
                     reward_weights: Optional[Mapping[str, float]] = None, per_turn: bool = False,
               timeout: Optional[float] = None
                     ) -> AsyncIterator[Tuple[str, Union[List[t.ScoreResult], t.ArbiterError]]]:
        """ScoreStream: yields (request_id, results or ArbiterError) in completion order."""
        msgs = [pb.ScoreStreamRequest(request_id=str(rid),
                                      request=t.score_request(items, truncation, reward_weights, per_turn))
                for rid, items in requests]
        call = self._stub.ScoreStream(iter(msgs), timeout=timeout if timeout is not None else self.timeout,
                                      metadata=self._metadata)
        try:
            async for m in call:
                if m.HasField("error"):
                    yield m.request_id, t.ArbiterError(status_code(m.error.code), m.error.message)
                else:
                    self._warn(m.response)
                    yield m.request_id, [t.result(x) for x in m.response.results]
        except grpc.aio.AioRpcError as e:
            raise t.ArbiterError(e.code(), e.details() or "") from None

    async def model_info(self, *, timeout: Optional[float] = None) -> t.ModelInfo:
        return t.model_info(await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

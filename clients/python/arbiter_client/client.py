"""Synchronous client."""
from __future__ import annotations

import random
import sys
import time
import warnings
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import types as t
from ._gen import arbiter_pb2 as pb
from ._gen import arbiter_pb2_grpc as pb_grpc

#: Status codes worth retrying: the request was not computed and may succeed later.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_MESSAGE_BYTES = 256 << 20


class _Base:
    """What the blocking and asyncio clients share: the channel (from `_grpc`, which is `grpc` or
    `grpc.aio`), auth metadata, the retry policy and the one-time demo warning."""

    _grpc = grpc

    def __init__(self, target: str = "localhost:50051", *, token: Optional[str] = None, tls: bool = False,
                 root_certificates: Optional[bytes] = None, timeout: Optional[float] = 60.0, retries: int = 3,
                 backoff: float = 0.2, max_message_bytes: int = MAX_MESSAGE_BYTES):
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = self._grpc.secure_channel(target, creds, opts)
        else:
            self._channel = self._grpc.insecure_channel(target, opts)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._warned = False

    def _retry_delay(self, code, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying a failed attempt, or None when it must not be retried."""
        if code in RETRYABLE and attempt <= self.retries:
            return self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
        return None

    def _warn(self, reply) -> None:
        """Says once per client that the server's scores are meaningless (the demo model)."""
        if getattr(reply, "warning", "") and not self._warned:
            self._warned = True
            warnings.warn(f"arbiter: {reply.warning}", UserWarning, stacklevel=_outside_this_package())


def _outside_this_package() -> int:
    """The `stacklevel` of the first frame outside arbiter_client, for `warnings.warn` called by
    the function that calls this: the warning then names the user's line, whether they called
    `Client.score` directly or through `ArbiterReward` or a stream."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("arbiter_client"):
        frame = frame.f_back
        level += 1
    return level


class Client(_Base):
    """Blocking client of an arbiter server.

    >>> c = Client("localhost:50051")
    >>> c.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])[0].reward

    `token` sends `authorization: Bearer <token>`; `tls` / `root_certificates` use TLS;
    `timeout` is each call's deadline in seconds; UNAVAILABLE and RESOURCE_EXHAUSTED are retried
    `retries` times with exponential backoff starting at `backoff` seconds (with jitter).
    """

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout):
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=timeout if timeout is not None else self.timeout,
                              metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e.code(), attempt)
                if delay is not None:
                    time.sleep(delay)
                    continue
                raise t.ArbiterError(e.code(), e.details() or "", attempt) from None

    def score(self, items: Sequence[t.ItemLike], *, truncation: Optional[str] = None,
              reward_weights: Optional[Mapping[str, float]] = None, per_turn: bool = False,
              timeout: Optional[float] = None) -> List[t.ScoreResult]:
        """Scores items (conversations, or dicts with messages / text / token_ids), in order.

        ``per_turn=True`` also scores every conversation after each assistant turn, in the same
        pass (``ScoreResult.turns``; conversations only)."""
        r = self._call(self._stub.Score, t.score_request(items, truncation, reward_weights, per_turn), timeout)
        self._warn(r)
        return [t.result(x) for x in r.results]

    def rank(self, prompt: t.Conversation, candidates: Sequence[str], *, truncation: Optional[str] = None,
             reward_weights: Optional[Mapping[str, float]] = None, timeout: Optional[float] = None) -> t.RankResult:
        """Scores each candidate as the assistant reply to `prompt`; `order` is best first."""
        r = self._call(self._stub.Rank, t.rank_request(prompt, candidates, truncation, reward_weights), timeout)
        self._warn(r)
        return t.RankResult([t.result(x) for x in r.results], list(r.order), r.model_fingerprint)

    def stream(self, requests: Iterable[Tuple[str, Sequence[t.ItemLike]]], *, truncation: Optional[str] = None,
               reward_weights: Optional[Mapping[str, float]] = None, per_turn: bool = False,
               timeout: Optional[float] = None
               ) -> Iterator[Tuple[str, Union[List[t.ScoreResult], t.ArbiterError]]]:
        """ScoreStream: yields (request_id, results or ArbiterError) in completion order."""
        def gen():
            for rid, items in requests:
                yield pb.ScoreStreamRequest(request_id=str(rid),
                                            request=t.score_request(items, truncation, reward_weights, per_turn))
        try:
            for m in self._stub.ScoreStream(gen(), timeout=timeout if timeout is not None else self.timeout,
                                            metadata=self._metadata):
                if m.HasField("error"):
                    yield m.request_id, t.ArbiterError(status_code(m.error.code), m.error.message)
                else:
                    self._warn(m.response)
                    yield m.request_id, [t.result(x) for x in m.response.results]
        except grpc.RpcError as e:
            raise t.ArbiterError(e.code(), e.details() or "") from None

    def model_info(self, *, timeout: Optional[float] = None) -> t.ModelInfo:
        return t.model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def tokenize(self, item: t.ItemLike, *, truncation: Optional[str] = None, timeout: Optional[float] = None):
        """(templated text, token ids) of one item, as the server would score it."""
        r = self._call(self._stub.Tokenize, pb.TokenizeRequest(item=t.to_item(item),
                                                               truncation=t.truncation_value(truncation)), timeout)
        return r.text, list(r.token_ids)


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode with this number (UNKNOWN if none)."""
    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c
    return grpc.StatusCode.UNKNOWN

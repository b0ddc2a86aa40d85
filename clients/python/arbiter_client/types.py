"""Typed results and the conversion of user inputs to protobuf items."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ._gen import arbiter_pb2 as pb

#: A conversation: a list of {"role": ..., "content": ...} dicts.
Conversation = Sequence[Mapping[str, str]]
#: What can be scored: a conversation, {"messages": conv}, {"text": str} or {"token_ids": [int]}.
ItemLike = Union[Conversation, Mapping[str, Any]]

_TRUNCATION = {None: pb.TRUNCATION_UNSPECIFIED, "error": pb.TRUNCATION_ERROR, "truncate": pb.TRUNCATION_TRUNCATE,
               "truncate_content": pb.TRUNCATION_TRUNCATE_CONTENT}


@dataclass(frozen=True)
class Truncation:
    """What the server's truncation did to an input."""

    truncated: bool
    original_tokens: int
    dropped_messages: int
    dropped_tokens: int


@dataclass(frozen=True)
class TurnResult:
    """The score after one assistant turn (``per_turn=True``): the conversation stopped there.

    ``scored`` is False for a turn truncation cut away (no attributes, reward 0); ``on_spine``
    says it was computed as a branch of the whole conversation rather than on its own.
    """

    message_index: int
    scored: bool
    attributes: Dict[str, float]
    reward: float
    tokens: int
    on_spine: bool


@dataclass(frozen=True)
class ScoreResult:
    """The score of one item: attributes by name, the weighted reward, the token count, and with
    ``per_turn=True`` one :class:`TurnResult` per assistant turn (the last equals the item)."""

    attributes: Dict[str, float]
    reward: float
    tokens: int
    truncation: Truncation
    turns: List[TurnResult] = field(default_factory=list)


@dataclass(frozen=True)
class RankResult:
    """Candidates' results in input order, and `order`: candidate indices, best first."""

    results: List[ScoreResult]
    order: List[int]
    model_fingerprint: str


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits."""

    architecture: str
    attributes: List[str]
    default_reward_weights: Dict[str, float]
    max_input_tokens: int
    model_fingerprint: str
    backend: str
    chat_template: str
    vocab_size: int
    limits: Dict[str, Any] = field(default_factory=dict)
    warning: str = ""


class ArbiterError(Exception):
    """A request failed; `code` is the grpc.StatusCode, `attempts` how many tries were made."""

    def __init__(self, code, message: str, attempts: int = 1):
        super().__init__(f"{code.name if hasattr(code, 'name') else code}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts


def truncation_value(t: Optional[str]) -> int:
    try:
        return _TRUNCATION[t]
    except KeyError:
        raise ValueError(f"truncation must be None, 'error', 'truncate' or 'truncate_content', not {t!r}") from None


def _messages(conv: Conversation) -> "pb.Conversation":
    msgs = []
    for i, m in enumerate(conv):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        msgs.append(pb.Message(role=str(m["role"]), content=str(m["content"])))
    return pb.Conversation(messages=msgs)


def to_item(x: ItemLike) -> "pb.Item":
    """Converts a conversation or an item dict to a protobuf Item."""
    if isinstance(x, Mapping):
        keys = [k for k in ("messages", "text", "token_ids") if k in x]
        if len(keys) != 1:
            raise ValueError("an item dict needs exactly one of 'messages', 'text', 'token_ids'")
        if keys[0] == "messages":
            return pb.Item(conversation=_messages(x["messages"]))
        if keys[0] == "text":
            return pb.Item(text=str(x["text"]))
        return pb.Item(token_ids=pb.TokenIds(ids=[int(t) for t in x["token_ids"]]))
    return pb.Item(conversation=_messages(x))


def score_request(items: Sequence[ItemLike], truncation: Optional[str], reward_weights: Optional[Mapping[str, float]],
                  per_turn: bool = False):
    return pb.ScoreRequest(items=[to_item(x) for x in items], truncation=truncation_value(truncation),
                           reward_weights=dict(reward_weights or {}), per_turn=bool(per_turn))


def rank_request(prompt: Conversation, candidates: Sequence[str], truncation, reward_weights):
    return pb.RankRequest(prompt=_messages(prompt), candidates=[str(c) for c in candidates],
                          truncation=truncation_value(truncation), reward_weights=dict(reward_weights or {}))


def result(r) -> ScoreResult:
    t = r.truncation
    turns = [TurnResult(x.message_index, x.scored, dict(x.attributes), x.reward, x.tokens, x.on_spine)
             for x in r.turns]
    return ScoreResult(attributes=dict(r.attributes), reward=r.reward, tokens=r.tokens,
                       truncation=Truncation(t.truncated, t.original_tokens, t.dropped_messages, t.dropped_tokens),
                       turns=turns)


def model_info(m) -> ModelInfo:
    lim = m.limits
    return ModelInfo(
        architecture=m.architecture, attributes=list(m.attributes),
        default_reward_weights=dict(m.default_reward_weights), max_input_tokens=m.max_input_tokens,
        model_fingerprint=m.model_fingerprint, backend=m.backend, chat_template=m.chat_template,
        vocab_size=m.vocab_size, warning=m.warning,
        limits={"max_batch_tokens": lim.max_batch_tokens, "max_batch_requests": lim.max_batch_requests,
                "queue_capacity": lim.queue_capacity, "max_items_per_request": lim.max_items_per_request,
                "max_message_bytes": lim.max_message_bytes, "default_truncation": lim.default_truncation})

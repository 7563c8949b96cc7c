"""Fault selection: which rules apply to a request or batch, and the effects they add up to."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from simulator.config import FaultRule
from simulator.errors import bad_request

_RULES = TypeAdapter(list[FaultRule])

FAULT_HEADER = "x-sim-faults"


@dataclass(slots=True)
class ChatFaults:
    """The effects applying to one chat-completion request."""

    ttft_ms: float
    chunk_delay_ms: float
    status: int | None = None
    retry_after_s: float = 1.0
    message: str | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0
    keepalive_ms: float | None = None
    second_choice: bool = False
    no_finish_reason: bool = False
    append_text: str | None = None
    stream_usage: dict[str, Any] | None = None
    applied: int = 0


@dataclass(slots=True)
class BatchPlan:
    """The faults chosen for one batch; ``fate(text)`` decides each line in file order."""

    fail_validation: bool = False
    expire_after: int | None = None
    line_rules: list[tuple[FaultRule, random.Random]] = field(default_factory=list)

    def fate(self, text: str) -> str | None:
        """``None`` (answer it), ``"lose"`` (write it nowhere) or ``"error"`` (400 line)."""
        result: str | None = None
        for rule, rng in self.line_rules:
            if rule.match is not None and rule.match not in text:
                continue
            if rule.probability >= 1.0 or rng.random() < rule.probability:
                result = "lose" if rule.batch == "lose_lines" else "error"
        return result


def parse_fault_header(value: str | None) -> list[FaultRule]:
    """Rules from an ``X-Sim-Faults`` header: one rule object or a list of them."""
    if not value:
        return []
    try:
        data = orjson.loads(value)
        return _RULES.validate_python(data if isinstance(data, list) else [data])
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise bad_request(f"Invalid X-Sim-Faults header: {exc}") from None


class FaultEngine:
    """Holds the configured rules with their per-rule call counters and PRNGs."""

    def __init__(self, rules: Sequence[FaultRule]) -> None:
        self.rules = list(rules)
        self._counts = [0] * len(self.rules)
        self._rngs = [random.Random(f"sheepdog-sim-rule-{i}") for i in range(len(self.rules))]

    def _take(self, index: int, rule: FaultRule, *, draw: bool = True) -> bool:
        """Count a call against a rule's ``first`` limit and draw its ``probability``."""
        if rule.first is not None and self._counts[index] >= rule.first:
            return False
        self._counts[index] += 1
        if draw and rule.probability < 1.0:
            return self._rngs[index].random() < rule.probability
        return True

    def chat(
        self,
        model: str,
        text: str,
        extra: Sequence[FaultRule],
        ttft_ms: float,
        chunk_delay_ms: float,
    ) -> ChatFaults:
        """Effects for a chat request: configured rules in order, then the header's rules."""
        faults = ChatFaults(ttft_ms=ttft_ms, chunk_delay_ms=chunk_delay_ms)
        for index, rule in enumerate(self.rules):
            if rule.is_batch or (rule.match is not None and rule.match not in text):
                continue
            if rule.model is not None and rule.model != model:
                continue
            if self._take(index, rule):
                _merge(faults, rule)
        for rule in extra:
            if not rule.is_batch and (rule.match is None or rule.match in text):
                _merge(faults, rule)
        return faults

    def batch_matches(self, extra: Sequence[FaultRule]) -> set[str]:
        """The ``match`` strings of batch-wide rules (the validator reports which occur)."""
        return {
            r.match
            for r in [*self.rules, *extra]
            if r.batch in ("fail_validation", "expire") and r.match is not None
        }

    def batch(self, model: str, seen: set[str], extra: Sequence[FaultRule]) -> BatchPlan:
        """The fault plan of a batch of ``model`` whose lines contain the matches ``seen``."""
        plan = BatchPlan()
        indexed = [(i, r) for i, r in enumerate(self.rules) if r.is_batch]
        indexed += [(-1, r) for r in extra if r.is_batch]
        for index, rule in indexed:
            if rule.model is not None and rule.model != model:
                continue
            per_line = rule.batch in ("lose_lines", "error_lines")
            if not per_line and rule.match is not None and rule.match not in seen:
                continue
            if index >= 0 and not self._take(index, rule, draw=not per_line):
                continue
            if per_line:
                rng = self._rngs[index] if index >= 0 else random.Random(0)
                plan.line_rules.append((rule, rng))
            elif index < 0 and rule.probability < 1.0 and random.random() >= rule.probability:
                continue
            elif rule.batch == "fail_validation":
                plan.fail_validation = True
            else:
                plan.expire_after = rule.after_lines if rule.after_lines is not None else -1
        return plan


def _merge(faults: ChatFaults, rule: FaultRule) -> None:
    faults.applied += 1
    for name in (
        "ttft_ms",
        "chunk_delay_ms",
        "status",
        "message",
        "cut_after",
        "stall_after",
        "keepalive_ms",
        "second_choice",
        "no_finish_reason",
        "append_text",
        "stream_usage",
    ):
        value = getattr(rule, name)
        if value is not None:
            setattr(faults, name, value)
    if rule.status is not None:
        faults.retry_after_s = rule.retry_after_s
    if rule.stall_after is not None:
        faults.stall_s = rule.stall_s

"""GenerationPlan: a prefill plan and a decode plan that share the weights and the KV cache.

Both plans are ordinary `Plan`s over their phase's graph. What binds them: a group resident
on a GPU is resident in both (one copy of its weights per device), and each layer's cache
lives where the layer runs; where prefill and decode put a layer's cache on different
devices, the cache moves once per request, after prefill (`moves`, priced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetero.errors import ConfigError
from hetero.partitioner.explain import explain_generation
from hetero.partitioner.phases import Phase
from hetero.partitioner.plan import JsonFile, Plan

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class StateMove:
    """A layer's cache copied from its prefill device to its decode device, once a request."""

    state: tuple[str, ...]  # buffer placeholders
    src: str
    dst: str
    bytes: int
    predicted_ms: float


@dataclass(frozen=True)
class GroupChoice:
    """Why a group sits where it sits in one phase: the chosen placement and the others'
    predicted times (what explain() prints)."""

    group: str
    chosen: str  # "gpu resident", "gpu split 41% (cpu float16)", ...
    predicted_ms: float
    alternatives: tuple[tuple[str, float], ...]  # (placement, ms) of every allowed other
    reason: str = ""


@dataclass(frozen=True)
class GenerationPlan(JsonFile):
    prefill: Plan
    decode: Plan
    batch: int
    max_len: int
    moves: tuple[StateMove, ...] = ()
    choices: tuple[tuple[str, tuple[GroupChoice, ...]], ...] = ()  # phase -> per group
    notes: tuple[str, ...] = field(default=())
    schema_version: int = SCHEMA_VERSION

    def plan(self, phase: Phase) -> Plan:
        return self.prefill if phase is Phase.PREFILL else self.decode

    @property
    def move_ms(self) -> float:
        return sum(m.predicted_ms for m in self.moves)

    @property
    def predicted_ttft_ms(self) -> float:
        """Prefill, the cache moves, and the first sampled token."""
        return self.prefill.predicted_ms + self.move_ms

    @property
    def predicted_decode_ms(self) -> float:
        return self.decode.predicted_ms

    def choice(self, phase: Phase) -> tuple[GroupChoice, ...]:
        return dict(self.choices).get(phase.value, ())

    # ---- JSON --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationPlan:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(
                f"generation plan schema {d.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                "plan again"
            )
        return cls(
            prefill=Plan.from_dict(d["prefill"]),
            decode=Plan.from_dict(d["decode"]),
            batch=int(d["batch"]),
            max_len=int(d["max_len"]),
            moves=tuple(StateMove(**{**m, "state": tuple(m["state"])}) for m in d.get("moves", ())),
            choices=tuple(
                (
                    phase,
                    tuple(
                        GroupChoice(
                            **{
                                **c,
                                "alternatives": tuple((a, float(t)) for a, t in c["alternatives"]),
                            }
                        )
                        for c in rows
                    ),
                )
                for phase, rows in d.get("choices", ())
            ),
            notes=tuple(d.get("notes", ())),
        )

    # ---- for people ----------------------------------------------------------------------------
    def explain(self, width: int = 140) -> str:
        return explain_generation(self, width=width)

"""One generation request on its way out: a model worker makes the tokens, the protocol's
handler sends them as they come.

The worker (`produce`) checks between tokens whether to go on: a deadline that passed or
a reader that went away (a client's cancel, a closed connection) stops the generation
after the step in flight, so the model is free for the next request. The reader
(iterating the stream) waits for each token no longer than the deadline allows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hetero.errors import ConfigError, InvalidInput, Unavailable
from hetero.interfaces.serving.outcome import Code, GenerationSettings, Outcome

_DONE = object()
# gRPC ends a call at its deadline through the same callback as a client's cancel; the
# stream's own clock (`expires`, taken from the same remaining time a moment later) may read
# a hair short of it. A cancel this close to `expires` is the deadline's.
_DEADLINE_SLACK_S = 0.005


@dataclass(frozen=True)
class Token:
    index: int  # 0 for the first new token
    token_ids: torch.Tensor  # [batch] int64, one per sequence
    ms: float  # since the request was admitted


class TokenStream:
    """Iterate it for Tokens; afterwards `outcome` says how it ended (OK, DEADLINE_EXCEEDED,
    CANCELLED, INVALID_ARGUMENT, ...). `on_end(stream)` runs once, when the end is known."""

    def __init__(
        self,
        servable: Any,
        ids: torch.Tensor,
        settings: GenerationSettings,
        *,
        expires: float,
        on_end: Callable[[TokenStream], None],
    ) -> None:
        self.servable = servable
        self.ids = ids
        self.settings = settings
        self.expires = expires  # time.monotonic() after which it stops
        self.outcome: Outcome | None = None
        self.first_ms: float | None = None  # time to first token
        self.token_ms = 0.0  # when the last token came
        self.last_ms = 0.0  # when the stream ended
        self.tokens = 0
        self._on_end = on_end
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3 if self.outcome is None else self.last_ms

    @property
    def seconds(self) -> float:
        return self.ms / 1e3

    @property
    def ms_per_token(self) -> float | None:
        """Decode time per token after the first (None with fewer than two tokens)."""
        if self.first_ms is None or self.tokens < 2:
            return None
        return (self.token_ms - self.first_ms) / (self.tokens - 1)

    # ---- the model worker's side -------------------------------------------------------------
    def produce(self) -> None:
        """Generate into the queue until done, stopped or out of time (a model worker)."""
        if self._stop.is_set():
            return
        if time.monotonic() > self.expires:
            # waited out its deadline in the queue: do not spend the work
            self._queue.put(self._deadline("while it waited for a model worker"))
            return
        tokens = None
        try:
            tokens = self.servable.stream(self.ids, self.settings)
            for t in tokens:
                self._queue.put(t)
                if self._stop.is_set():
                    return
                if time.monotonic() > self.expires:
                    self._queue.put(self._deadline("mid-stream"))
                    return
            self._queue.put(_DONE)
        except (InvalidInput, ConfigError) as e:
            self._queue.put(Outcome(Code.INVALID_ARGUMENT, str(e)))
        except Unavailable as e:
            self._queue.put(Outcome(Code.UNAVAILABLE, str(e)))
        except Exception as e:  # a worker fault: say what failed, keep serving others
            self._queue.put(Outcome(Code.INTERNAL, f"{type(e).__name__}: {e}"))
        finally:
            close = getattr(tokens, "close", None)
            if callable(close):
                close()  # ends the generation loop (and frees its lock) at once

    def _deadline(self, where: str) -> Outcome:
        return Outcome(
            Code.DEADLINE_EXCEEDED,
            f"the deadline passed {where} after {self.tokens} token(s); generation stopped",
        )

    # ---- the handler's side ------------------------------------------------------------------
    def cancel(self, outcome: Outcome | None = None) -> None:
        """Stop generating (a client that went away, or gRPC ending the call at its deadline:
        then the outcome is DEADLINE_EXCEEDED, whichever side noticed first); the worker
        stops after its step."""
        if outcome is None:
            if time.monotonic() >= self.expires - _DEADLINE_SLACK_S:
                outcome = self._deadline("mid-stream" if self.tokens else "before a token")
            else:
                outcome = Outcome(Code.CANCELLED, "the client cancelled the request")
        self._finish(outcome)

    def __iter__(self) -> Iterator[Token]:
        try:
            while self.outcome is None:
                wait = self.expires - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(wait, 0.0)) if wait > 0 else None
                except queue.Empty:
                    item = None
                if item is None:
                    self._finish(self._deadline("mid-stream" if self.tokens else "before a token"))
                elif item is _DONE:
                    self._finish(Outcome(Code.OK))
                elif isinstance(item, Outcome):
                    self._finish(item)
                else:
                    ms = (time.perf_counter() - self._t0) * 1e3
                    if self.first_ms is None:
                        self.first_ms = ms
                    self.token_ms = ms
                    index = self.tokens
                    self.tokens += 1
                    yield Token(index, item.reshape(-1).to(torch.int64), ms)
        finally:
            if self.outcome is None:  # the reader stopped early: its client went away
                self.cancel()

    def _finish(self, outcome: Outcome) -> None:
        with self._lock:
            if self.outcome is not None:
                return
            self.last_ms = (time.perf_counter() - self._t0) * 1e3
            self.outcome = outcome
            self._stop.set()
        self._queue.put(_DONE)  # wakes a reader still waiting for a token (a cancel)
        self._on_end(self)

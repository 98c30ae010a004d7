"""Threads sharing one model: forwards run together, a change waits for them and runs alone.

`ModelLock` is the lock of a model's `AdapterState`. Calls that change the
model (add, load, delete, merge, set or disable adapters) hold it as a plain
re-entrant lock: `with state.lock:`. Entering waits until every forward
running in another thread has returned, and keeps new ones waiting until the
change is done, so no forward ever sees half a change (a torn output) and no
change sees a half-finished forward. Forwards hold it shared
(`with state.lock.running():`) and run concurrently with each other.

A change made from inside a forward of the same model, in the same thread (a
forward hook that merges), would wait for itself; it raises instead.

`DISABLED` holds the models with a `disable_adapter()` block open in this
thread (or asyncio task): a mixed batch, whose adapter_names name adapters
explicitly, is turned off only by a block of its own thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

# {AdapterState}: the models with a disable_adapter() block open in this context.
DISABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("peftlite_disabled",  # noqa: B039
                                                                       default=frozenset())


class ModelLock:
    """A re-entrant writer lock (model changes) that also counts readers (forwards)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None  # the thread changing the model
        self._depth = 0  # re-entries of the owner
        self._running: dict[int, int] = {}  # thread id -> forwards it is inside

    def __enter__(self) -> ModelLock:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return self
            if self._running.get(me):
                raise RuntimeError("cannot change a model from inside its own forward (a hook?): the change "
                                   "would wait for that forward to end; change it before or after the call")
            while self._owner is not None:
                self._cond.wait()
            self._owner, self._depth = me, 1  # new forwards wait from here on
            while self._running:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Held by a forward: waits for a change in another thread, then runs beside other forwards."""
        me = threading.get_ident()
        with self._cond:
            # A thread already inside a forward (or changing the model) goes on: waiting would deadlock.
            while self._owner is not None and self._owner != me and not self._running.get(me):
                self._cond.wait()
            self._running[me] = self._running.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._running[me] -= 1
                if not self._running[me]:
                    del self._running[me]
                self._cond.notify_all()

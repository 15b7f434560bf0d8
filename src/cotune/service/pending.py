"""What passes between the HTTP threads and the runner: queued requests, their futures, remote jobs' views."""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Pending(Generic[T]):
    """A thread-safe list: ``put`` from any thread, ``take`` everything queued so far."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._lock = threading.Lock()

    def put(self, item: T) -> None:
        with self._lock:
            self._items.append(item)

    def take(self) -> list[T]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def __bool__(self) -> bool:
        return bool(self._items)


def settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``fut`` unless its caller gave up on it (a timed-out request cancels its future): a late answer
    must never raise inside the runner or the trainer's pipe reader."""
    if fut.done():
        return
    try:
        fut.set_exception(error) if error is not None else fut.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        pass


class RemoteViews:
    """Per remote-fitter job, what its worker may fetch (setup, weights, applied update, awaited frame): changed by
    partial ``update``s from the trainer, read whole by the worker routes."""

    def __init__(self) -> None:
        self._views: dict[str, dict[str, Any]] = {}

    def update(self, job_id: str, fields: dict[str, Any] | None) -> None:
        """Merge ``fields`` into the job's view; ``None``: the job left the trainer."""
        if fields is None:
            self._views.pop(job_id, None)
        else:
            self._views[job_id] = {**self._views.get(job_id, {}), **fields}

    def get(self, job_id: str) -> dict[str, Any] | None:
        view = self._views.get(job_id)
        return dict(view) if view is not None else None

    def clear(self) -> None:
        self._views.clear()

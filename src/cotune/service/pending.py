"""Requests queued by the HTTP threads and taken, all at once, by the runner's worker thread."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

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

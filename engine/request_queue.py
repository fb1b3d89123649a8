"""The waiting queue in policy order: fcfs (arrival) or priority (a key), pure Python."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from engine.request import Request


class RequestQueue:
    """Waiting requests in policy order; ``push_front`` is for preempted/prefilled ones."""

    def __init__(self, priority_key: Callable[[Request], tuple] | None) -> None:
        self._key = priority_key  # None: fcfs
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def push(self, request: Request) -> None:
        if self._key is None:
            self._requests.append(request)
        else:
            bisect.insort(self._requests, request, key=self._key)

    def push_front(self, request: Request) -> None:
        # Under "priority" the order is the key's: a resumed request keeps its rank.
        if self._key is None:
            self._requests.insert(0, request)
        else:
            self.push(request)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

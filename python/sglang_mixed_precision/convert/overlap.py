"""Reading, quantizing and writing overlap: a reader thread loads the next unit while the device
works on the current one, and a writer thread flushes finished units into the shards.

Both queues are bounded (the reader runs at most ``depth`` units ahead, the writer holds at most
``depth`` units of outputs), so memory stays bounded by a few units whatever the model's size. An
exception in either thread (a corrupt shard, a full disk, an interruption) is re-raised in the main
thread as the same exception object, at its next hand-off; nothing waits forever on a dead thread.
With ``threaded=False`` both run inline, in order: the same code path without threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
POLL_S = 0.1  # how often a blocked hand-off looks whether the other side stopped


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless ``stop`` is set first (the reader's consumer went away); True when queued."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


class Prefetcher(Generic[T, R]):
    """Iterate (item, load(item)) in order, with load running up to ``depth`` items ahead in a thread."""

    def __init__(self, items: Iterable[T], load: Callable[[T], R], *, depth: int = 1, threaded: bool = True):
        self.items, self.load, self.threaded = list(items), load, threaded
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[tuple[T, R]]:
        if not self.threaded:
            for item in self.items:
                yield item, self.load(item)
            return
        self._thread = threading.Thread(target=self._run, name="convert-reader", daemon=True)
        self._thread.start()
        try:
            while True:
                got = self._queue.get()
                if got is _END:
                    return
                if isinstance(got, _Failure):
                    raise got.error
                yield got
        finally:
            self.close()

    def _run(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set() or not _put(self._queue, (item, self.load(item)), self._stop):
                    return
        except BaseException as e:
            _put(self._queue, _Failure(e), self._stop)
        else:
            _put(self._queue, _END, self._stop)

    def close(self) -> None:
        """Stop the reader (it finishes the unit it is loading) and drop what it loaded ahead."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                self._drain()
                self._thread.join(POLL_S)
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class BackgroundWriter(Generic[T]):
    """Run write(item) for every submitted item, in order, in a thread; at most ``depth`` wait."""

    def __init__(self, write: Callable[[T], None], *, depth: int = 2, threaded: bool = True):
        self.write, self.threaded = write, threaded
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="convert-writer", daemon=True)
            self._thread.start()

    def submit(self, item: T) -> None:
        if not self.threaded:
            self.write(item)
            return
        self._raise_if_failed()
        if self._thread is None:
            raise RuntimeError("submit after the writer was closed")
        while True:
            try:
                self._queue.put(item, timeout=POLL_S)
                break
            except queue.Full:
                self._raise_if_failed()  # a failed writer drains its queue: no wait on a dead thread
        self._raise_if_failed()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is not None or self._stop.is_set():
                continue  # failed or aborted: drop what is still queued
            try:
                self.write(item)
            except BaseException as e:
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until everything submitted is written; re-raise the writer's exception if it failed."""
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

    def abort(self) -> None:
        """Drop what is queued, let the item being written finish, and stop (the error, if any, stays)."""
        self._stop.set()
        if self._thread is not None:
            self._queue.put(_END)  # the thread drains without writing, so there is room
            self._thread.join()
            self._thread = None

"""The loader of a :class:`~selkd.trainer.data.CacheStream`: DataLoader workers (or one prefetching
thread), and the cursor advanced only when the training loop *takes* a batch, so that ``state_dict()``
resumes exactly (see :mod:`selkd.trainer.data` for the order and the cursor)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from selkd.trainer.batch import Batch
from selkd.trainer.data import CacheStream, WorkerFailure, mp_context

__all__ = ["StatefulLoader", "make_loader"]


# --- the loader ----------------------------------------------------------------------------------


class _ThreadPrefetcher:
    """Runs a batch generator in a background thread, ``depth`` batches ahead."""

    _END = object()

    def __init__(self, source: Iterator[Batch], depth: int, pin: bool) -> None:
        self.source, self.pin = source, pin
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="selkd-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self.source:
                if self.pin:
                    batch = batch.pin_memory()
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer
            self._put(err)
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


class StatefulLoader:
    """A DataLoader over a :class:`CacheStream` whose iteration starts at the stream's cursor and
    advances it by the batches the consumer takes. ``len(loader)`` is the number of batches the next
    iteration yields; ``state_dict()`` / ``load_state_dict()`` are the stream's."""

    def __init__(self, stream: CacheStream, num_workers: int = 1, prefetch: int = 2, pin_memory: bool = False) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {num_workers}")
        if num_workers > 0 and prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 with worker processes, not {prefetch}")
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch = max(0, prefetch)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.multiprocessing_context = mp_context(stream.url) if num_workers > 0 else None

    def __len__(self) -> int:
        return self.stream.steps_remaining()

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def _dataloader(self) -> DataLoader:
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[Batch]:
        stream = self.stream
        iteration, epoch, samples = stream._begin()
        if stream._steps_from(samples) == 0:
            return
        prefetcher: _ThreadPrefetcher | None = None
        if self.num_workers > 0:
            source: Iterator[Batch] = iter(self._dataloader())
        elif self.prefetch > 0:
            prefetcher = _ThreadPrefetcher(stream._generate(epoch, samples), self.prefetch, self.pin_memory)
            source = iter(prefetcher)
        else:
            source = stream._generate(epoch, samples)
        try:
            for batch in source:
                if isinstance(batch, WorkerFailure):
                    raise batch.error
                if prefetcher is None and self.num_workers == 0 and self.pin_memory:
                    batch = batch.pin_memory()
                stream._consume(iteration)
                yield batch
        finally:
            if prefetcher is not None:
                prefetcher.close()
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(
    stream: CacheStream, num_workers: int = 1, prefetch: int = 2, pin_memory: bool = False
) -> StatefulLoader:
    """A :class:`StatefulLoader`: ``num_workers`` DataLoader worker processes, each ``prefetch``
    batches ahead (``spawn`` for remote URLs, ``fork`` locally); with ``num_workers=0`` a background
    thread ``prefetch`` batches ahead (``prefetch=0``: no prefetching)."""
    return StatefulLoader(stream, num_workers=num_workers, prefetch=prefetch, pin_memory=pin_memory)

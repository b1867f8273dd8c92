"""One thread per process sampling its memory over time, for every consumer at once.

During an update a training worker has two consumers of the same reading:
the update's trace (`training.trace.UpdateTrace`: RSS, private memory and the
service's usage, every 0.1 s and slower as it grows, for the report) and the
training loop's peak RSS (`RssSampler`, every `train.rss_sample_interval_s`,
10 ms by default). Rather than a thread each, `MemorySampler` runs one: it
wakes at the earliest due time of its listeners, reads this process's RSS
once and hands it to every listener whose own period has come. Each keeps
its meaning: the peak is still the highest RSS sampled at its period; the
trace still reads private memory and the service's usage itself, at its
own. `process_sampler()` is the process's one sampler, so no consumer can
start a second thread; it runs while it has listeners, and a forked child
starts without it (threads do not survive a fork).

The cost of sharing: a listener's slow reads (the trace's private memory,
~1 ms; the service's PSS, ~7 ms per torch process every 2 s) hold back the
next RSS tick by as much, so a peak shorter than that gap can be missed, as
one shorter than the period always could. The dry runs do not sample: they
read the kernel's high-water mark (`usage.reset_peak_rss`, `usage.peak_rss_mb`).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

# Called on the sampler's thread with this process's RSS in bytes; must be quick.
Listener = Callable[[int], None]


@dataclass(eq=False)
class Subscription:
    """A listener of a `MemorySampler` and its period; the period may change while it listens."""

    listener: Listener
    interval_s: float
    due: float  # time.monotonic() of its next call


class MemorySampler:
    """One thread reading this process's RSS and handing it to listeners, each at its own period.

    The first `add()` starts the thread, the `remove()` of the last listener
    ends it; once `remove()` returns, that listener is not called again.
    """

    def __init__(self, name: str = "memory-sampler") -> None:
        self.name = name
        self._process = psutil.Process()
        # Reentrant: a listener, called under it, may add or remove listeners.
        self._changed = threading.Condition(threading.RLock())
        self._subscriptions: list[Subscription] = []
        self._thread: threading.Thread | None = None

    def rss_bytes(self) -> int:
        """This process's RSS now: what each listener is handed."""
        return int(self._process.memory_info().rss)

    def add(self, listener: Listener, interval_s: float) -> Subscription:
        """Call `listener(rss_bytes)` from the sampler's thread every `interval_s`, first one period from now."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        subscription = Subscription(listener, interval_s, time.monotonic() + interval_s)
        with self._changed:
            self._subscriptions.append(subscription)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._changed.notify()  # a period shorter than the thread's current wait starts now
        return subscription

    def remove(self, subscription: Subscription) -> None:
        """Stop calling its listener; removing the last one ends the thread (joined here)."""
        with self._changed:
            self._subscriptions.remove(subscription)
            ending = None
            if not self._subscriptions:
                ending, self._thread = self._thread, None
            self._changed.notify()
        if ending is not None and ending is not threading.current_thread():
            ending.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._changed:
            while self._thread is me:
                now = time.monotonic()
                due = [s for s in self._subscriptions if s.due <= now]
                if not due:
                    self._changed.wait(min(s.due for s in self._subscriptions) - now)
                    continue
                # Listeners run under the lock: none is called after its remove() returned.
                try:
                    rss = self.rss_bytes()
                    for subscription in due:
                        if subscription in self._subscriptions:
                            self._call(subscription, rss)
                except psutil.Error:
                    log.exception("memory sample failed")
                for subscription in due:
                    # The period counts from the end of the sample, as a `stop.wait(interval)` loop's does.
                    subscription.due = time.monotonic() + subscription.interval_s

    @staticmethod
    def _call(subscription: Subscription, rss: int) -> None:
        try:
            subscription.listener(rss)
        except Exception:
            # One consumer's failure must not stop the others' samples.
            log.exception("memory sample listener %r failed", subscription.listener)


_process_sampler: MemorySampler | None = None
_process_sampler_lock = threading.Lock()


def process_sampler() -> MemorySampler:
    """This process's one `MemorySampler`, made on first use."""
    global _process_sampler
    with _process_sampler_lock:
        if _process_sampler is None:
            _process_sampler = MemorySampler()
        return _process_sampler


def _forget_after_fork() -> None:
    # A forked child has none of its parent's threads, its RSS is its own, and the lock may have
    # been held at the fork: it starts afresh.
    global _process_sampler, _process_sampler_lock
    _process_sampler, _process_sampler_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakMemory:
    start_rss_bytes: int  # RSS when sampling began
    peak_rss_bytes: int  # highest sampled RSS (sampling can miss spikes shorter than the interval)
    ru_maxrss_bytes: int  # the kernel's high-water mark for the whole process lifetime
    samples: int

    @property
    def increase_bytes(self) -> int:
        return self.peak_rss_bytes - self.start_rss_bytes

    def to_dict(self) -> dict[str, int]:
        return {
            "start_rss_bytes": self.start_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "ru_maxrss_bytes": self.ru_maxrss_bytes,
            "samples": self.samples,
        }


def ru_maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RssSampler:
    """The peak of this process's RSS while it runs, from `process_sampler()`; use as a context manager.

    The kernel's `ru_maxrss` is exact but covers the whole process lifetime, so
    a window of time needs sampling; both are reported.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._sampler: MemorySampler | None = None
        self._subscription: Subscription | None = None
        self._start = 0
        self._peak = 0
        self._samples = 0

    def _sample(self, rss: int) -> None:
        self._peak = max(self._peak, rss)
        self._samples += 1

    def start(self) -> RssSampler:
        self._sampler = process_sampler()
        self._start = self._sampler.rss_bytes()
        self._peak = self._start
        self._subscription = self._sampler.add(self._sample, self.interval_s)
        return self

    def stop(self) -> PeakMemory:
        sampler = self._sampler or process_sampler()
        if self._subscription is not None:
            sampler.remove(self._subscription)
            self._subscription = None
        self._sample(sampler.rss_bytes())
        return self.result()

    def result(self) -> PeakMemory:
        return PeakMemory(self._start, self._peak, ru_maxrss_bytes(), self._samples)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

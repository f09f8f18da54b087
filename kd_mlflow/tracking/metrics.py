"""The metric buffer: metrics leave the epoch loop at once and reach the server from a
daemon thread; during an outage they wait, bounded, and what the server never takes
goes to the run's offline directory."""

from __future__ import annotations

import collections
import threading
import time

from .health import _Link, _say, redact
from .offline import _Offline

MAX_BUFFERED_METRICS = 100_000  # beyond this, the oldest buffered points go to the fallback file


def _as_metrics(metrics: dict, step: int | None) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]


class _OfflineMetrics:
    """The metric buffer of a run created offline: its points go straight to the offline file."""

    def __init__(self, offline: _Offline):
        self.offline = offline

    def add(self, metrics: dict, step: int | None) -> None:
        self.offline.add_metrics(_as_metrics(metrics, step))

    def flush(self, timeout: float = 60.0) -> bool:
        return False

    def close(self) -> None:
        pass


class _MetricBuffer:
    """Metrics in logging order, delivered in batches by a daemon thread, so the epoch
    loop never waits on the server; an outage only delays them. Bounded: beyond
    MAX_BUFFERED_METRICS points the oldest go to the offline file (never dropped)."""

    def __init__(self, run_id: str, link: _Link, offline: _Offline):
        self.run_id, self.link, self.offline = run_id, link, offline
        self.pending: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name=f"kd-metrics-{run_id[:8]}", daemon=True)
        self.thread.start()

    def add(self, metrics: dict, step: int | None) -> None:
        with self.cond:
            self.pending.extend(_as_metrics(metrics, step))
            overflow = len(self.pending) - MAX_BUFFERED_METRICS
            if overflow > 0:
                self.offline.add_metrics([self.pending.popleft() for _ in range(overflow)])
            self.cond.notify_all()

    def _next_batch(self) -> list:
        return [self.pending[i] for i in range(min(1000, len(self.pending)))]

    def _deliver(self, batch) -> bool:
        if not self.link.up():
            return False
        try:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run_id, metrics=batch, synchronous=True)
            return True
        except Exception as exc:
            if self.link.up():
                _say(f"warning: logging metrics to run {self.run_id} failed ({type(exc).__name__}: "
                     f"{redact((str(exc).splitlines() or [''])[0])[:200]}); retrying")
            return False

    def _done(self, batch) -> None:
        with self.cond:
            for _ in batch:
                self.pending.popleft()
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return  # close() delivers the rest on the caller's thread
                batch = self._next_batch()
            if self._deliver(batch):
                self._done(batch)
            else:
                with self.cond:
                    self.cond.wait(timeout=2.0)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every point added so far has been delivered; False if some are still
        pending after ``timeout`` seconds (the server is away: they stay buffered)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return not self.pending

    def close(self) -> None:
        """Deliver what is left, waiting for an absent server (KD_TRACKING_OUTAGE_WAIT);
        what it never takes goes to the offline directory."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        failures = 0
        while self.pending and failures < 3:
            if not self.link.wait(f"{len(self.pending)} buffered metric values"):
                break
            batch = self._next_batch()
            if self._deliver(batch):
                self._done(batch)
            else:
                failures += 1
        if self.pending:
            self.offline.add_metrics(list(self.pending))
            self.pending.clear()

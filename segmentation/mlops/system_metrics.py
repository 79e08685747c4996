"""CPU, memory (and GPU) samples of a training as ``system/*`` metrics, logged through the tracker's journal."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


class SystemMetricsSampler:
    """A daemon thread that samples every ``interval`` seconds and hands the averages to ``log_metrics``.

    Args:
        run_id: the run sampled (MLflow's monitor needs it, nothing is sent from here).
        interval: seconds between samples.
        log_metrics: called as ``log_metrics(metrics, step)``; the tracker journals them like any other metric.
        first_step: the step of the first sample (after a resume: one past the last logged one).
    """

    def __init__(
        self, run_id: str, interval: float, log_metrics: Callable[[Mapping[str, float], int], None], first_step: int
    ) -> None:
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval)
        self._interval, self._log, self._step = interval, log_metrics, first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._monitor.collect_metrics()
            metrics = {f"system/{k}": v for k, v in self._monitor.aggregate_metrics().items()}
            for monitor in self._monitor.monitors:
                monitor.clear_metrics()
            if metrics and not self._stop.is_set():
                self._log(metrics, self._step)
                self._step += 1

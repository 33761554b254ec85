"""What the processes involved use: the worker's peak RSS, and the CPU of the worker, this
process, the broker, Postgres and the whole machine."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import psutil

from scripts.bench.scenario import Services

RSS_SAMPLE_SECONDS = 0.1


class RssSampler(threading.Thread):
    """Samples the RSS of a process and all its children every 100 ms (the list of children
    is refreshed every second: finding them scans /proc, which costs more than sampling)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self._process = psutil.Process(pid)
        self._stop_event = threading.Event()
        self.peak_bytes = 0
        self.samples = 0

    def run(self) -> None:
        children: list[psutil.Process] = []
        while not self._stop_event.is_set():
            if self.samples % 10 == 0:
                with contextlib.suppress(psutil.Error):
                    children = self._process.children(recursive=True)
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            for child in children:
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop_event.wait(RSS_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class CpuMeter:
    """CPU seconds of the worker, the broker, the Postgres server and the whole machine."""

    def __init__(self, worker_pids: list[int], services: Services) -> None:
        self._groups: dict[str, list[psutil.Process]] = {
            "worker": [psutil.Process(pid) for pid in worker_pids],
            "bench": [psutil.Process(os.getpid())],  # this script: producer and pollers
        }
        for name, port in (
            ("kafka", _port(services.kafka_bootstrap_servers)),
            ("postgres", urlsplit(services.database_url).port),
        ):
            owner = _listening_process(port) if port else None
            if owner is not None:
                self._groups[name] = [owner]
        self._start: dict[str, float] = {}
        self._machine_start: Any = None
        self._wall_start = 0.0

    def _cpu(self, name: str) -> float:
        total = 0.0
        for root in self._groups[name]:
            try:
                processes = [root] if name == "bench" else [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
        return total

    def start(self) -> None:
        self._wall_start = time.perf_counter()
        self._start = {name: self._cpu(name) for name in self._groups}
        self._machine_start = psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        """Cores used on average since start(), per group and for the whole machine.
        (Children that ended in between, e.g. short-lived Postgres backends, are missed.)"""
        wall = time.perf_counter() - self._wall_start
        used = {
            name: round((self._cpu(name) - self._start[name]) / wall, 2) for name in self._groups
        }
        machine = psutil.cpu_times()
        busy = sum(
            getattr(machine, attribute) - getattr(self._machine_start, attribute)
            for attribute in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        used["machine_busy"] = round(busy / wall, 2)
        # Busy CPU not accounted to the groups above: other tenants of a shared machine
        # (and short-lived processes). A large value means a noisy run.
        accounted = sum(used[name] for name in self._groups)
        used["other"] = round(max(0.0, used["machine_busy"] - accounted), 2)
        used["machine_steal"] = round((machine.steal - self._machine_start.steal) / wall, 2)
        used["machine_cores"] = psutil.cpu_count() or 0
        return used


def _port(bootstrap: str) -> int | None:
    first = bootstrap.split(",", 1)[0]
    try:
        return int(first.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def _listening_process(port: int) -> psutil.Process | None:
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (
                connection.status == psutil.CONN_LISTEN
                and connection.laddr.port == port
                and connection.pid
            ):
                return psutil.Process(connection.pid)
    except psutil.Error:
        return None
    return None

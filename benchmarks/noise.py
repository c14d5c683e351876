"""Telling other people's work from the kernel's work for the system under test.

``cpu_phase`` counts as noise everything it cannot name: other processes, but also the kernel.
For a server that commits to PostgreSQL on every request, the kernel's share is large and its
own: the journal thread and the block device's interrupts behind each fsync, loopback
networking in softirq; on this 2-core machine they land on the server's core as often as not.
``OtherProcesses`` reads every process in ``/proc`` at the start and at the end of a measurement
and sums the CPU of the user-space processes that are not part of the run (neither the started
servers, nor their children, nor PostgreSQL's backends of the benchmark's database, nor this
script and its load generators): that is the noise. The kernel's threads (children of
``kthreadd``), interrupt time and what ``ours`` names beyond the servers (PostgreSQL's WAL
writer and checkpointer) are reported together as ``kernel, pg aux``.

A process of someone else's that starts and ends within a measurement is missed (it is gone
from ``/proc`` before the second reading): the test suites that share this machine are long-lived
``pytest`` processes, PostgreSQL backends and Redis servers, which are seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.procs import CpuReport, Processes, descendants

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_KTHREADD = 2


def _stat(entry: Path) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one ``/proc/<pid>``, or None when it is gone."""
    try:
        text = (entry / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _snapshot() -> dict[int, tuple[int, float]]:
    found: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry)) is not None:
            found[int(entry.name)] = stat
    return found


class OtherProcesses:
    """``begin()`` before a measurement, ``attribute(report)`` after: moves the kernel's share
    out of ``unattributed`` (to ``kernel``) and caps ``server core, others`` at what other
    processes used on the whole machine (the rest of it was the kernel working for the run)."""

    def __init__(self, processes: Processes, ours: Callable[[], Iterable[int]] = tuple) -> None:
        self.processes = processes
        self.ours = ours  # more pids of the run: PostgreSQL backends, a gateway's workers
        self._before: dict[int, tuple[int, float]] = {}

    def begin(self) -> None:
        self._before = _snapshot()

    def _ours(self) -> set[int]:
        pids = {os.getpid(), *self.ours()}
        for entry in self.processes.started:
            pids.add(entry.pid)
            pids.update(descendants(entry.pid))
        pids.update(descendants(os.getpid()))
        return pids

    def attribute(self, report: CpuReport) -> None:
        if report.wall_s <= 0 or not self._before:
            return
        after = _snapshot()
        ours = self._ours()
        other = 0.0
        for pid, (parent, seconds) in after.items():
            if pid in ours or pid == _KTHREADD or parent == _KTHREADD:
                continue
            _, before = self._before.get(pid, (parent, 0.0))
            other += seconds - before
        other_percent = 100 * other / report.wall_s
        unattributed = report.percent.get("unattributed", 0.0)
        kernel = max(0.0, unattributed - other_percent)
        report.percent["other processes"] = other_percent
        report.percent["kernel, pg aux"] = kernel
        report.percent["unattributed"] = unattributed - kernel
        on_core = report.percent.get("server core, others")
        if on_core is not None:
            report.percent["server core, others"] = min(on_core, other_percent)

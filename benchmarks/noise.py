"""Telling the kernel's work for the system under test from other people's work.

``cpu_phase`` counts as noise everything it cannot name: other processes, but also the kernel.
For a server that commits to PostgreSQL on every request, the kernel's share is large and its
own: the journal thread and the block device's interrupts behind each fsync, loopback
networking in softirq; on this 2-core machine they land on the server's core as often as not.
``KernelShare`` reads, at the start and the end of a measurement, the interrupt and softirq time
of ``/proc/stat``, the CPU of the kernel's threads (children of ``kthreadd``) and of the
processes ``aux`` names (PostgreSQL's WAL writer and checkpointer), and moves that much out of
``unattributed`` into ``kernel, pg aux``. What is left unattributed is other processes (those
that came and went within the measurement too) and steal time: the noise.

On the server's core, the same share is taken out of ``server core, others`` (the interrupts of
that core exactly; the kernel threads and ``aux`` as if they had all run there, which may
forgive a little real noise when the kernel was busy elsewhere).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.common import SERVER_CORE
from benchmarks.procs import CpuReport, process_cpu_seconds

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_KTHREADD = 2


def interrupt_seconds(core: int | None = None) -> float:
    """CPU seconds spent in interrupts and softirqs since boot, on all cores or on one."""
    prefix = "cpu " if core is None else f"cpu{core} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(prefix):
                parts = line.split()
                return (int(parts[6]) + int(parts[7])) / _CLK_TCK
    return 0.0


def kernel_thread_seconds() -> dict[int, float]:
    """CPU seconds of each kernel thread (a child of ``kthreadd``)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == _KTHREADD:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return found


class KernelShare:
    """``begin()`` before a measurement, ``attribute(report)`` after it (see the module)."""

    def __init__(self, aux: Callable[[], Iterable[int]] = tuple) -> None:
        self.aux = aux
        self._aux_pids: list[int] = []
        self._threads: dict[int, float] = {}
        self._irq = self._irq_core = self._aux_cpu = 0.0

    def begin(self) -> None:
        self._aux_pids = list(self.aux())
        self._aux_cpu = sum(process_cpu_seconds(pid) for pid in self._aux_pids)
        self._threads = kernel_thread_seconds()
        self._irq, self._irq_core = interrupt_seconds(), interrupt_seconds(SERVER_CORE)

    def attribute(self, report: CpuReport) -> None:
        if report.wall_s <= 0 or not self._threads:
            return
        threads = sum(
            seconds - self._threads.get(pid, 0.0)
            for pid, seconds in kernel_thread_seconds().items()
        )
        aux = sum(process_cpu_seconds(pid) for pid in self._aux_pids) - self._aux_cpu
        irq = interrupt_seconds() - self._irq
        irq_core = interrupt_seconds(SERVER_CORE) - self._irq_core
        unattributed = report.percent.get("unattributed", 0.0)
        kernel = min(max(0.0, unattributed), 100 * (threads + aux + irq) / report.wall_s)
        report.percent["kernel, pg aux"] = kernel
        report.percent["unattributed"] = unattributed - kernel
        on_core = report.percent.get("server core, others")
        if on_core is not None:
            forgiven = 100 * (threads + aux + irq_core) / report.wall_s
            report.percent["server core, others"] = max(0.0, on_core - forgiven)

"""Processes of a benchmark run: started pinned to a core, stopped in reverse order, never leaked.

Every server is started in a session of its own (a Ctrl-C reaches only the orchestrator, which then
stops them in order) and with ``PR_SET_PDEATHSIG``, so even a ``kill -9`` of the orchestrator
takes them down. CPU use is read from ``/proc`` to say, per phase, which process was busy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _child_setup(cores: set[int] | None) -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if cores is not None:
        os.sched_setaffinity(0, cores)


def pin_self(cores: set[int]) -> None:
    """Pin this process (and so every child it starts later) to ``cores``."""
    os.sched_setaffinity(0, cores)


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None
    log_file: IO[bytes] | None

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Processes:
    """The servers of one run, stopped in reverse start order by :meth:`stop_all`."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cores: set[int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Started:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(cores),
        )
        entry = Started(name, proc, log_path, log_file)
        self.started.append(entry)
        return entry

    def adopt(self, name: str, proc: subprocess.Popen[bytes]) -> Started:
        """Take charge of a process started elsewhere (e.g. by ``gateway.dev.services``)."""
        entry = Started(name, proc, None, None)
        self.started.append(entry)
        return entry

    def stop(self, entry: Started, timeout: float = 5.0) -> None:
        proc = entry.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        if entry.log_file is not None:
            entry.log_file.close()
        if entry in self.started:
            self.started.remove(entry)

    def stop_all(self) -> None:
        for entry in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(entry)

    def log_tail(self, entry: Started, lines: int = 20) -> str:
        if entry.log_path is None or not entry.log_path.exists():
            return ""
        return "\n".join(entry.log_path.read_text(errors="replace").splitlines()[-lines:])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads together."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds(core: int | None = None) -> float:
    """CPU seconds all cores (or one) spent not idle, steal included, since boot."""
    prefix = "cpu " if core is None else f"cpu{core} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(prefix):
                parts = line.split()
                break
        else:
            return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def pinned_to(pid: int) -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(pid))
    except OSError:
        return frozenset()


def own_cpu_seconds() -> float:
    """CPU of this process plus its children that have been waited for (load generators)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class CpuReport:
    wall_s: float = 0.0
    percent: dict[str, float] = field(default_factory=dict)  # of one core

    def discount_load(self, seconds: float) -> None:
        """Take out CPU a waited-for child spent before the phase began (it is counted whole)."""
        if self.wall_s > 0 and "load generator" in self.percent:
            moved = 100 * seconds / self.wall_s
            self.percent["load generator"] = max(0.0, self.percent["load generator"] - moved)
            self.percent["unattributed"] = self.percent.get("unattributed", 0.0) + moved


@contextlib.contextmanager
def cpu_phase(processes: Processes, server_core: int = 0) -> Iterator[CpuReport]:
    """CPU use over the ``with`` block, as % of one core: of each started server, of the load
    generators (this process and the children it waited for), of everything else on the machine
    (``unattributed``), and of everything on ``server_core`` but the servers pinned there
    (``server core, others``: what disturbed the server under test)."""
    report = CpuReport()
    live = list(processes.started)
    on_core = [e.name for e in live if pinned_to(e.pid) == {server_core}]
    before = {e.name: process_cpu_seconds(e.pid) for e in live}
    own0, t0 = own_cpu_seconds(), time.perf_counter()
    busy0, core0 = machine_busy_seconds(), machine_busy_seconds(server_core)
    yield report
    wall = time.perf_counter() - t0
    busy = machine_busy_seconds() - busy0
    core = machine_busy_seconds(server_core) - core0
    own = own_cpu_seconds() - own0
    used = {e.name: process_cpu_seconds(e.pid) - before[e.name] for e in live}
    report.wall_s = wall
    if wall <= 0:
        return
    report.percent = {name: 100 * s / wall for name, s in used.items()}
    report.percent["load generator"] = 100 * own / wall
    # Other processes of the machine, interrupts and loopback networking in softirq.
    report.percent["unattributed"] = 100 * (busy - own - sum(used.values())) / wall
    report.percent["server core, others"] = 100 * (core - sum(used[n] for n in on_core)) / wall


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (a gateway's workers), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found

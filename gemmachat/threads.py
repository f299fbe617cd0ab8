"""How many CPU threads each decode uses, when the user leaves -t to us: as many as other
processes leave free.

ggml's OpenMP threads spin at each of the hundreds of barriers in a token's graph. When another
process holds one of their CPUs, the others spin until the scheduler hands it back, at every
barrier: on 2 cores beside 2 busy processes, -t 2 generated 19x slower than -t 1, llama.cpp's own
programs alike. A fixed wait policy trades that for about 8% on an idle machine
(docs/performance.md). So the engine asks a ThreadGovernor before each decode; a few times a
second it reads how much CPU time other processes took on the CPUs we may use (/proc/stat less
our own /proc/self/stat) and answers the number of CPUs they left free, at least one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Often enough to follow a compile starting or stopping within a second; rarely enough that the
# kernel's tick accounting (10 ms) is precise over the window.
CHECK_EVERY = 0.25


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks since boot: busy on the CPUs we may use, all of theirs, and this process's own."""

    busy: int
    total: int
    own: int


def read_cpu_times(cpus: frozenset[int], proc: Path = Path("/proc")) -> CpuTimes | None:
    """None where /proc/stat is not Linux's (macOS, Windows): then the thread count stays fixed."""
    try:
        stat = (proc / "stat").read_text()
        own_fields = (proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    busy = total = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdecimal() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        ticks = [int(value) for value in rest.split()[:8]]
        if len(ticks) < 8:
            return None
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    if total == 0:
        return None
    # utime and stime of every thread of this process: fields 14 and 15, 12 and 13 after the name.
    return CpuTimes(busy, total, int(own_fields[11]) + int(own_fields[12]))


def usable_cpus() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return frozenset(range(os.cpu_count() or 1))


def free_cpus(before: CpuTimes, after: CpuTimes, cpus: int) -> float:
    """CPUs that other processes left free between two readings (steal counts as taken)."""
    elapsed = (after.total - before.total) / cpus  # ticks of wall time, per CPU
    if elapsed <= 0:
        return float(cpus)
    others = max(0, (after.busy - before.busy) - (after.own - before.own))
    return max(0.0, cpus - others / elapsed)


def fixed_threads_notice(before: CpuTimes | None, after: CpuTimes | None, threads: int, cpus: int) -> str | None:
    """For a fixed -t: one line when other processes took the CPUs it needs between two readings
    (the model's load), since the governor that would step aside is off; None otherwise."""
    if before is None or after is None or threads < 2 or (after.total - before.total) / cpus < 10:
        return None  # no /proc, one thread (never waits on another), or too short to tell
    free = free_cpus(before, after, cpus)
    if free >= min(threads, cpus) - 0.5:  # more threads than CPUs is slow anyway, busy or not
        return None
    return (f"other processes kept {cpus - free:.1f} of the {cpus} CPUs busy while the model loaded: with "
            f"-t {threads}, llama.cpp's threads wait on each other there and generation can be many times "
            "slower; without -t, gemma-chat uses the CPUs they leave free")


class ThreadGovernor:
    """Answers the thread count for the next decode, between 1 and `maximum`.

    Fewer threads at once when other processes take CPUs (a spinning team collapses at once),
    more only after two readings agree (a passing spike should not make it flap)."""

    def __init__(self, maximum: int, cpus: frozenset[int] | None = None,
                 read: Callable[[frozenset[int]], CpuTimes | None] = read_cpu_times,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.current = maximum
        self._cpus = cpus or usable_cpus()
        self._read = read
        self._clock = clock
        self._last = read(self._cpus)
        self._last_at = clock()
        self._rising = 0

    def threads(self) -> int:
        if self._last is None or self._clock() - self._last_at < CHECK_EVERY:
            return self.current
        now = self._read(self._cpus)
        if now is None:
            return self.current
        wanted = min(self.maximum, max(1, math.floor(free_cpus(self._last, now, len(self._cpus)) + 0.5)))
        self._last, self._last_at = now, self._clock()
        if wanted < self.current:
            self.current, self._rising = wanted, 0
        elif wanted > self.current:
            self._rising += 1
            if self._rising >= 2:
                self.current, self._rising = wanted, 0
        else:
            self._rising = 0
        return self.current

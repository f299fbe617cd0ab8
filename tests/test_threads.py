"""The thread count follows the load (gemmachat/threads.py): real CPU hogs, real /proc, real llama.cpp."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace

import pytest

from gemmachat.threads import CpuTimes, ThreadGovernor, fixed_threads_notice, free_cpus, read_cpu_times, usable_cpus

CPUS = usable_cpus()


@pytest.fixture
def hogs():
    """One busy process per usable CPU, as a parallel compile would be."""
    processes = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in CPUS]
    time.sleep(0.2)
    yield len(processes)
    for process in processes:
        process.kill()
        process.wait()


def test_free_cpus_sees_other_processes(hogs: int) -> None:
    def one_second() -> float:
        before = read_cpu_times(CPUS)
        time.sleep(1.0)
        after = read_cpu_times(CPUS)
        assert before is not None and after is not None
        return free_cpus(before, after, len(CPUS))

    # The hogs take (nearly) every CPU; this test process sleeps. Seen within three seconds: once,
    # beside the suite's other worker, one second's ticks showed a CPU free.
    readings = [one_second()]
    while readings[-1] >= 0.5 and len(readings) < 3:
        readings.append(one_second())
    assert readings[-1] < 0.5, readings


def test_our_own_work_is_told_apart_from_others() -> None:
    before, cpu_before = read_cpu_times(CPUS), time.process_time()
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:  # this process keeps one CPU busy itself
        pass
    after, cpu_after = read_cpu_times(CPUS), time.process_time()
    assert before is not None and after is not None
    # What /proc/self/stat says this process used is what the OS tells Python (ticks are 10 ms).
    own_seconds = (after.own - before.own) / os.sysconf("SC_CLK_TCK")
    assert abs(own_seconds - (cpu_after - cpu_before)) < 0.05
    # and it is not counted against the CPUs left free.
    as_if_another_process = free_cpus(replace(before, own=0), replace(after, own=0), len(CPUS))
    assert free_cpus(before, after, len(CPUS)) > as_if_another_process


def test_governor_drops_at_once_and_rises_only_when_two_readings_agree() -> None:
    readings = iter([(0, 0), (200, 200), (400, 400), (400, 600), (400, 800)])  # (busy, total) ticks
    clock = iter(range(0, 100))

    def read(cpus):
        busy, total = next(readings)
        return CpuTimes(busy=busy, total=total, own=0)

    governor = ThreadGovernor(2, frozenset({0, 1}), read=read, clock=lambda: float(next(clock)))
    assert governor.threads() == 1  # others took both CPUs
    assert governor.threads() == 1  # still busy
    assert governor.threads() == 1  # idle once: not yet
    assert governor.threads() == 2  # idle twice


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs to have fewer threads to go to")
def test_cli_decodes_with_fewer_threads_beside_hogs(run_cli, hogs: int) -> None:
    # llama.cpp logs every change of thread count (llama_set_n_threads) in --verbose.
    result = run_cli("--cli", "-p", "Once upon a time", "-n", "48", "--ignore-eos", "--temp", "0",
                     "--verbose", timeout=300)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "set_n_threads: n_threads = 1" in result.stderr


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_an_explicit_thread_count_is_kept_and_said_to_be_busy(run_cli, hogs: int) -> None:
    result = run_cli("--cli", "-p", "Once upon a time", "-n", "8", "--ignore-eos", "--temp", "0",
                     "-t", str(len(CPUS)), "--verbose", timeout=300)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "set_n_threads" not in result.stderr
    # The hogs kept the CPUs busy while the model loaded: one line says what -t costs then.
    notice = [line for line in result.stderr.splitlines() if "CPUs busy while the model loaded" in line]
    assert len(notice) == 1 and f"with -t {len(CPUS)}," in notice[0] and "without -t" in notice[0], notice


def test_the_busy_notice_only_for_a_fixed_count_that_others_take() -> None:
    def reading(busy: int, total: int, own: int = 0) -> CpuTimes:
        return CpuTimes(busy=busy, total=total, own=own)

    start = reading(0, 0)
    # 2 CPUs for one second (200 ticks): others took 150 ticks, so half a CPU was left.
    assert "kept 1.5 of the 2 CPUs busy" in fixed_threads_notice(start, reading(150, 200), 2, 2)
    # The same ticks, but our own load took 100 of them: 1.5 CPUs left, enough for -t 2.
    assert fixed_threads_notice(start, reading(150, 200, own=100), 2, 2) is None
    assert fixed_threads_notice(start, reading(150, 200), 1, 2) is None  # one thread waits on none
    assert fixed_threads_notice(start, reading(10, 200), 8, 2) is None  # more threads than CPUs, all free
    assert fixed_threads_notice(start, reading(4, 10), 2, 2) is None  # 50 ms: too short to tell
    assert fixed_threads_notice(None, reading(150, 200), 2, 2) is None  # no /proc/stat

"""How many CPU threads a run uses, chosen on purpose (``threads:`` in a recipe, ``--threads``).

torch and ONNX Runtime default to one thread per core. On cores other work already keeps busy,
their threads spin-wait for each other and a run gets many times slower than with one
thread (demo training on 2 shared cores: adapt epochs of 98-273 s against 10.6-15.9 s).
So the default is one thread per *idle* physical core: the cores this process may use, less
the cores other work keeps busy right now, at least 1 and at most the physical cores
(hyper-threads share one core's arithmetic units, so they do not speed up matrix work).
"Busy right now" is CPU time sampled from /proc/stat over a fifth of a second, not the load
average: on an idle VM the load average sits near 1 from tasks waiting on I/O (which use no
CPU), and on 2 cores that alone halved the default. The load average is the fallback where
/proc/stat is unreadable. ``OMP_NUM_THREADS``, when set, is
taken as the user's choice."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    reason: str  # why this many, as printed and written to the report

    def __str__(self) -> str:
        return f"{self.count} thread{'s' if self.count != 1 else ''} ({self.reason})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; the logical count where that is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return os.cpu_count() or 1
    pairs, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (see :func:`parse_cpu_line`)."""
    try:
        with open("/proc/stat") as f:
            return parse_cpu_line(f.readline())
    except OSError:
        return None


def parse_cpu_line(line: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of /proc/stat's ``cpu`` line. I/O wait counts as idle, and so does
    work at a lower priority (``nice``): the scheduler gives this run's threads its core."""
    parts = line.split()
    if not parts or parts[0] != "cpu":
        return None
    try:
        fields = [int(v) for v in parts[1:9]]
    except ValueError:
        return None
    if len(fields) < 5:
        return None
    free = fields[1] + fields[3] + fields[4]  # nice, idle, iowait; guest time is inside user already
    return sum(fields) - free, sum(fields)


def busy_cores(sample_s: float = 0.2) -> tuple[float, str]:
    """Cores' worth of CPU other work uses now, and where the figure came from."""
    import time

    first = _cpu_times()
    if first is not None:
        time.sleep(sample_s)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            share = (second[0] - first[0]) / (second[1] - first[1])
            return share * (os.cpu_count() or 1), "busy now"
    try:
        return os.getloadavg()[0], "load average"
    except OSError:
        return 0.0, "load unknown"


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count for this run and why."""
    if requested:
        return ThreadChoice(requested, "set by threads / --threads")
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "from OMP_NUM_THREADS")
    cores = usable_cores()
    limit = min(cores, physical_cores())
    busy, source = busy_cores()
    idle = math.floor(cores - busy + 0.5)
    count = max(1, min(limit, idle))
    return ThreadChoice(count, f"auto: {limit} physical cores usable, {busy:.1f} {source}")


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op threads; ONNX Runtime sessions edgevit opens read the same count."""
    import torch

    torch.set_num_threads(choice.count)
    return choice


def current_threads() -> int:
    """The count this process runs with (what the report records)."""
    import torch

    return torch.get_num_threads()

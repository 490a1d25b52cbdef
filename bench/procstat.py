"""What the kernel says about processes and the machine: CPU time, peak memory, hardware.

Read straight from /proc (Linux only), so the benchmark needs no extra package and
measures processes it did not write, such as functions-framework's forked worker.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name, which may itself hold spaces and parentheses."""
    text = (_PROC / str(pid) / "stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group: functions-framework's master and its workers."""
    pids = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 5 of stat, the process group, is the third after the name.
            if int(_stat_fields(int(entry.name))[2]) == pgid:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone between the listing and the read
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process, all its threads included."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def group_cpu_seconds(pgid: int) -> float:
    total = 0.0
    for pid in group_pids(pgid):
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had, in MiB."""
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    """VmRSS: the resident memory now, in MiB."""
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM afresh from the resident memory now (Linux 4.0+, ``clear_refs`` 5), so
    that a later :func:`peak_rss_mb` is the peak of what came after."""
    (_PROC / str(pid) / "clear_refs").write_text("5")


def group_peak_rss_mb(pgid: int) -> float:
    """The largest VmHWM in the group: the worker, which does the work, not the master."""
    peaks = [0.0]
    for pid in group_pids(pgid):
        try:
            peaks.append(peak_rss_mb(pid))
        except OSError:
            continue
    return max(peaks)


def own_cpu_seconds() -> float:
    """This process's CPU time (every thread, so the image server's too), not its children's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine, summed over cores, from /proc/stat."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    # user nice system idle iowait irq softirq steal; guest time is already in user.
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / _TICK


@dataclass(frozen=True)
class Snapshot:
    """CPU counters of the processes in a scenario, taken before and after it."""

    function: float
    simulator: float
    emulator: float
    own: float
    machine: float


def machine_info() -> dict[str, Any]:
    """What the numbers ran on: they mean little without it."""
    model = "unknown"
    for line in (_PROC / "cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in (_PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }

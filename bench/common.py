"""What every figure benchmark shares: the machine it ran on, interleaved timing, JSON and a table.

Figures are *ratios measured in one run*: each variant is timed in turn within one process, the
order rotated every repeat (A B C, B C A, ...), so a change in the machine's load hits every
variant alike. On a shared CPU the process's CPU time (``time.process_time``) is far steadier
than wall time and is the figure reported there; on CUDA the wall time after a synchronise is.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedvox.client.host import M_MMAP_THRESHOLD, mallopt
from fedvox.shared.atomic import atomic_write_text

RESULTS = Path("runs/bench")
"""Where figures are written unless ``--out`` says otherwise (ignored by git)."""


def load_average() -> float:
    """The one-minute load average (how busy the shared machine was)."""
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host(device: torch.device) -> dict[str, Any]:
    """Hardware, software versions and date of a measurement."""
    import flwr
    import opacus

    facts: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "flwr": flwr.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return facts


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (VmHWM)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where it is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


LIVE_MEMORY_THRESHOLD = 64 * 2**10
"""Blocks this large or larger are mmapped and unmapped on free: RSS follows live memory."""
HEAP_REUSE_THRESHOLD = 32 * 2**20
"""glibc's largest dynamic threshold: freed blocks stay in the heap for reuse (fast, as by default
after the first large frees)."""


def set_mmap_threshold(size: int) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, size)``; False where it is not glibc.

    With :data:`LIVE_MEMORY_THRESHOLD` a peak RSS is the peak of live memory, not of what the
    heap kept from earlier work, but allocation is slower (every block is fresh pages): measure
    memory and time in separate passes.
    """
    return mallopt(M_MMAP_THRESHOLD, size)


def interleaved(
    variants: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time every variant ``repeats`` times, rotating the order each round; medians per variant.

    Returns ``{name: {"cpu_s": [...], "wall_s": [...], "cpu_s_median", "wall_s_median"}}``.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, dict[str, list[float]]] = {n: {"cpu_s": [], "wall_s": []} for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            cpu, wall = time.process_time(), time.perf_counter()
            variants[name]()
            _sync(device)
            samples[name]["wall_s"].append(time.perf_counter() - wall)
            samples[name]["cpu_s"].append(time.process_time() - cpu)
    return {
        n: {**s, "cpu_s_median": statistics.median(s["cpu_s"]), "wall_s_median": statistics.median(s["wall_s"])}
        for n, s in samples.items()
    }


def timing_key(device: torch.device) -> str:
    """The figure a ratio is taken of: CPU time on a CPU, wall time on an accelerator."""
    return "cpu_s_median" if device.type == "cpu" else "wall_s_median"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(result: Mapping[str, Any], out: Path | None, name: str) -> Path:
    """Write ``result`` to ``out`` (default ``runs/bench/<name>.json``) atomically; returns the path."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (the short summary every benchmark prints last)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


__all__ = [
    "HEAP_REUSE_THRESHOLD",
    "LIVE_MEMORY_THRESHOLD",
    "RESULTS",
    "cpu_name",
    "host",
    "interleaved",
    "load_average",
    "peak_rss_bytes",
    "reset_peak_rss",
    "set_mmap_threshold",
    "table",
    "timing_key",
    "write_json",
]

"""Timing harness shared by the benchmark scripts.

One comparison = the toolkit's implementation ("ours") against a baseline written the way
the seed did it, on the same inputs, on the same machine, in ONE process:

* :func:`alternate` runs ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
  round calling ``ours`` then ``baseline`` (ours, baseline, ours, baseline, ...), so a
  change of machine load during the run hits both alike;
* :func:`make_result` turns the two lists of times into one JSON-ready entry whose
  ``ratio`` is ``median(baseline) / median(ours)`` (> 1: the toolkit is faster);
* :func:`format_table`, :func:`write_json` and :func:`machine_info` report it.

Nothing here knows about models: tests check the harness on trivial functions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from raug.files.atomic import atomic_write_text

OURS, BASELINE = "ours", "baseline"
# Keys every result entry carries (the JSON schema of ``run.py --json``).
RESULT_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "ratio": float,
    "ours": float,
    "baseline": float,
    "unit": str,
    "setup": (str, dict),
    "target": float,
    "met": bool,
}


@dataclass
class Timings:
    """Per-run seconds of both implementations and the order in which everything ran.

    Attributes:
        ours: timed runs of the toolkit's implementation (seconds).
        baseline: timed runs of the seed-style baseline (seconds).
        order: every call made, warm-up included, as ``(kind, name)`` pairs with
            ``kind`` in ``{"warmup", "timed"}`` and ``name`` in ``{"ours", "baseline"}``.
        values: the last return value of each implementation (for sanity checks).
    """

    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    order: list[tuple[str, str]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def sync_device(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall-clock times are complete."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    ours: Callable[[], Any],
    baseline: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    *,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    desc: str | None = None,
) -> Timings:
    """Time ``ours`` and ``baseline`` in alternation.

    Args:
        ours: the toolkit's implementation (no arguments; its return value is kept).
        baseline: the seed-style implementation.
        repeats: timed rounds (each round runs ``ours`` then ``baseline``); >= 1.
        warmup: untimed rounds before (kernels, allocator, thread pools, caches).
        sync: called after each run before the clock stops (e.g. CUDA synchronize).
        clock: time source in seconds (injectable for tests).
        desc: label of a tqdm progress bar over all runs (``None``: no bar).

    Returns:
        The :class:`Timings`.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"alternate: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    fns = {OURS: ours, BASELINE: baseline}
    out = Timings()
    schedule = [("warmup", name) for _ in range(warmup) for name in fns]
    schedule += [("timed", name) for _ in range(repeats) for name in fns]
    bar = tqdm(schedule, desc=desc, unit="run", leave=False, disable=desc is None)
    for kind, name in bar:
        start = clock()
        value = fns[name]()
        if sync is not None:
            sync()
        elapsed = clock() - start
        out.order.append((kind, name))
        out.values[name] = value
        if kind == "timed":
            getattr(out, name).append(elapsed)
    return out


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (ValueError when empty)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def speed_ratio(baseline_s: float, ours_s: float) -> float:
    """``baseline_s / ours_s``: how many times faster the toolkit is (> 1 = faster)."""
    if not ours_s > 0:
        raise ValueError(f"our time must be positive, got {ours_s}")
    return float(baseline_s) / float(ours_s)


def make_result(
    timings: Timings,
    unit: str,
    setup: str | Mapping[str, Any],
    target: float,
    scale: float = 1.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON entry ``{ratio, ours, baseline, unit, setup, target, met, ...}``.

    Args:
        timings: from :func:`alternate`.
        unit: what ``ours``/``baseline`` measure, e.g. ``"s/step"``.
        setup: sizes, device and settings the figures belong to.
        target: the ratio to reach; ``met`` is ``ratio >= target``.
        scale: multiplies the median seconds (e.g. ``1 / images`` for s/image).
        extra: more fields (raw figures, checks); may not override the schema keys.

    Returns:
        The entry, with the raw runs under ``ours_runs`` / ``baseline_runs``.
    """
    ours_s = median(timings.ours) * scale
    base_s = median(timings.baseline) * scale
    ratio = speed_ratio(base_s, ours_s)
    entry: dict[str, Any] = {
        "ratio": ratio,
        "ours": ours_s,
        "baseline": base_s,
        "unit": unit,
        "setup": dict(setup) if isinstance(setup, Mapping) else str(setup),
        "target": float(target),
        "met": bool(ratio >= target),
        "ours_runs": [t * scale for t in timings.ours],
        "baseline_runs": [t * scale for t in timings.baseline],
    }
    clash = set(extra or {}) & (set(entry))
    if clash:
        raise ValueError(f"make_result: extra fields {sorted(clash)} clash with the schema")
    entry.update(extra or {})
    return entry


def check_result(name: str, entry: Mapping[str, Any]) -> None:
    """Check one entry against :data:`RESULT_SCHEMA` and ``ratio = baseline / ours``.

    Raises:
        ValueError: naming the entry and the offending key.
    """
    for key, kind in RESULT_SCHEMA.items():
        if key not in entry:
            raise ValueError(f"benchmark result {name!r}: missing key {key!r}")
        value = entry[key]
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ValueError(f"benchmark result {name!r}: {key}={value!r} is not {kind}")
    expected = entry["baseline"] / entry["ours"]
    if abs(entry["ratio"] - expected) > 1e-9 * max(1.0, abs(expected)):
        raise ValueError(
            f"benchmark result {name!r}: ratio={entry['ratio']} != baseline/ours={expected}"
        )
    if entry["met"] != (entry["ratio"] >= entry["target"]):
        raise ValueError(f"benchmark result {name!r}: met={entry['met']} disagrees with ratio/target")


def _fmt_seconds(value: float, unit: str) -> str:
    if not unit.startswith("s/"):
        return f"{value:.3g}"
    return f"{1e3 * value:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: item, setup, ours, baseline, unit, ratio, target, met."""
    lines = [
        "| item | setup | ours | baseline | unit | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        setup = r["setup"]
        if isinstance(setup, Mapping):
            setup = ", ".join(f"{k}={v}" for k, v in setup.items())
        lines.append(
            f"| {name} | {setup} | {_fmt_seconds(r['ours'], r['unit'])} | "
            f"{_fmt_seconds(r['baseline'], r['unit'])} | {r['unit']} | {r['ratio']:.2f}x | "
            f">= {r['target']:g}x | {'yes' if r['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temp file + ``os.replace``."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


# ----------------------------------------------------------------------------- machine


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU model name (first ``model name`` line), or ``platform.processor()``."""
    try:
        with open(cpuinfo) as fh:
            lines = fh.readlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Machine, library versions, thread count, load and date for the report."""
    import torchvision  # local: only the report needs its version

    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "loadavg": load_average(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes(reset_ok: bool) -> int:
    """Peak RSS since :func:`reset_peak_rss` (``ru_maxrss`` of the process if no reset)."""
    if reset_ok:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> dict[str, Any]:
    """Extra peak memory of one call of ``fn`` over the memory in use before it.

    CUDA: ``max_memory_allocated`` (tensor bytes). CPU: peak RSS (``VmHWM``), which counts
    every page touched, allocator slack included; run it in a fresh process for a clean
    figure (earlier allocations freed to the allocator are not counted twice otherwise).
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync_device(device)
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device) - before,
            "method": "cuda.max_memory_allocated",
        }
    before = rss_bytes()
    reset_ok = reset_peak_rss()
    fn()
    return {
        "peak_bytes": peak_rss_bytes(reset_ok) - before,
        "method": "VmHWM" if reset_ok else "ru_maxrss",
    }

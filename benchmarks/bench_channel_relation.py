"""Benchmark ``kd_losses.channel_relation`` against the seed's direct Gram formula.

Usage (from the repository root)::

    python benchmarks/bench_channel_relation.py [--sizes 32 48 64 128] [--c 2048] [--hw 7]
        [--device cpu|cuda|auto] [--repeats 5] [--threads T] [--json OUT]

Time: forward + backward (gradient w.r.t. the student features; teacher features without
gradient), float32 inputs, median of ``repeats`` rounds that alternate ours / baseline
after one untimed warm-up round (:func:`common.alternate`).

Peak memory (:func:`common.peak_memory`): on CUDA, ``torch.cuda.max_memory_allocated``
minus the memory allocated before the step (inputs excluded). On CPU each implementation
runs once in a fresh subprocess: peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step; ``ru_maxrss`` where that is not allowed)
minus the RSS before the step. That counts every page the step touched, allocator slack
included, not just tensor bytes.

Other scripts import :func:`bench` (``from bench_channel_relation import bench`` with
``benchmarks/`` as the script folder, or ``from .bench_channel_relation import bench``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kd_losses import channel_relation
from raug.train.device import resolve_device

if __package__:
    from . import common
    from .baselines.seed_channel_relation import seed_channel_relation
else:
    import common
    from baselines.seed_channel_relation import seed_channel_relation

IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    common.OURS: channel_relation,
    common.BASELINE: seed_channel_relation,
}
TARGET_SPEEDUP = 10.0


def make_inputs(n: int, c: int, hw: int, device: torch.device, seed: int = 0):
    """Post-ReLU-like float32 student features and a teacher close to them."""
    gen = torch.Generator().manual_seed(seed)
    feat_s = torch.randn(n, c, hw, hw, generator=gen).relu()
    feat_t = (feat_s + 0.1 * torch.randn(n, c, hw, hw, generator=gen)).relu()
    return feat_s.to(device), feat_t.to(device)


def _step(impl: str, feat_s: torch.Tensor, feat_t: torch.Tensor) -> float:
    """One forward + backward; returns the loss value."""
    student = feat_s.detach().requires_grad_(True)
    loss = IMPLEMENTATIONS[impl](student, feat_t)
    loss.backward()
    return loss.detach().item()


def _child_peak(impl: str, n: int, c: int, hw: int) -> dict[str, Any]:
    """Run in a fresh process: extra peak RSS of one CPU step."""
    cpu = torch.device("cpu")
    _step(impl, *make_inputs(2, 8, hw, cpu))  # load kernels and thread pools first
    feat_s, feat_t = make_inputs(n, c, hw, cpu)
    return common.peak_memory(lambda: _step(impl, feat_s, feat_t), cpu)


def peak_memory(impl: str, n: int, c: int = 2048, hw: int = 7, device: str = "cpu") -> dict:
    """Extra peak memory of one forward + backward of ``impl`` (see module docstring)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        feat_s, feat_t = make_inputs(n, c, hw, dev)
        _step(impl, feat_s, feat_t)
        return common.peak_memory(lambda: _step(impl, feat_s, feat_t), dev)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", impl, str(n), str(c), str(hw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {impl} N={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time(n: int, c: int, hw: int, dev: torch.device, repeats: int) -> common.Timings:
    feat_s, feat_t = make_inputs(n, c, hw, dev)
    return common.alternate(
        lambda: _step(common.OURS, feat_s, feat_t),
        lambda: _step(common.BASELINE, feat_s, feat_t),
        repeats,
        warmup=1,
        sync=lambda: common.sync_device(dev),
        desc=f"channel_relation N={n}",
    )


def bench(n: int, c: int = 2048, hw: int = 7, device: str = "cpu", repeats: int = 5) -> dict:
    """Time and peak memory of ours vs the seed's direct formula at one size.

    Returns:
        A :func:`common.make_result` entry (``ratio`` = speed-up, ``ours`` / ``baseline``
        in s/step, ``target`` 10x) plus ``ours_peak_mb``, ``baseline_peak_mb``,
        ``memory_ratio``, ``memory_method``, ``value_ours``, ``value_baseline`` and
        their ``rel_diff``.
    """
    dev = resolve_device(device)
    timings = _time(n, c, hw, dev, repeats)  # its inputs are freed before the memory probes
    mem = {impl: peak_memory(impl, n, c, hw, str(dev)) for impl in IMPLEMENTATIONS}
    ours_mb = mem[common.OURS]["peak_bytes"] / 2**20
    base_mb = mem[common.BASELINE]["peak_bytes"] / 2**20
    value_ours, value_base = timings.values[common.OURS], timings.values[common.BASELINE]
    setup = {"n": n, "c": c, "hw": hw, "device": str(dev), "dtype": "float32",
             "pass": "forward+backward"}  # fmt: skip
    return common.make_result(
        timings,
        unit="s/step",
        setup=setup,
        target=TARGET_SPEEDUP,
        extra={
            "ours_peak_mb": ours_mb,
            "baseline_peak_mb": base_mb,
            "memory_ratio": base_mb / max(ours_mb, 1e-9),
            "memory_method": mem[common.OURS]["method"],
            "value_ours": value_ours,
            "value_baseline": value_base,
            "rel_diff": abs(value_ours - value_base) / abs(value_base),
        },
    )


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`bench` entries, memory included."""
    lines = [
        "| N | ours ms | direct ms | speed-up | ours peak MiB | direct peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']['n']} | {1e3 * r['ours']:.0f} | {1e3 * r['baseline']:.0f} | "
            f"{r['ratio']:.1f}x | {r['ours_peak_mb']:.0f} | {r['baseline_peak_mb']:.0f} | "
            f"{r['memory_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        impl, n, c, hw = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(_child_peak(impl, n, c, hw)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 128])
    parser.add_argument("--c", type=int, default=2048)
    parser.add_argument("--hw", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = [
        bench(n, args.c, args.hw, args.device, args.repeats)
        for n in tqdm(args.sizes, desc="channel_relation bench", unit="size")
    ]
    print(format_table(rows))
    if args.json is not None:
        info = common.machine_info(args.device)
        common.write_json(args.json, {"machine": info, "channel_relation": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run every speed comparison of the toolkit against its seed-style baseline, side by side.

Usage (from the repository root)::

    python benchmarks/run.py [--quick | --tiny] [--px PX] [--json OUT] [--device cpu|cuda|cuda:1|auto]
        [--only channel_relation dkd_step ssd_kd_step loader teacher_step]
        [--amp off|auto|bf16|fp16] [--no-channels-last] [--compile] [--skip-extras] [--threads T]
        [--loader-workers N ...]
    python benchmarks/run.py --summarize A.json B.json ...   # the GPU matrix of benchmarks/gpu.sh

Items (CPU targets; on CUDA only ``GPU_TARGETS`` decide the exit code), each measured in this one process, on the same inputs, in
alternating runs (ours, baseline, ours, ...) after warm-up, median of the timed runs:

* ``channel_relation``: hw x hw identity vs direct Gram matrices, forward + backward,
  N=48, C=2048, 7x7 (``bench_channel_relation.bench``): >= 10x.
* ``dkd_step``: one D-KD training step, batch 32 at 128 px (``dkd_step_224px``: at 224 px,
  full run only), toolkit vs seed-style (``baselines/seed_dkd_step.py``): >= 1.5x. The
  entry also holds the seed step's growth with piled-up hooks (``hook_growth``), the
  toolkit step's time and peak memory per batch size (``scaling``) and the projected
  epoch times of teacher CE, D-KD and SSD-KD (``epoch_projection``).
* ``ssd_kd_step``: one SSD-KD phase-2 step, 8 images (32 views) at 128 px
  (``ssd_kd_step_224px`` in the full run): >= 1.5x.
* ``loader``: training images/s, prepared cache vs full-size originals: >= 3x; with
  ``--loader-workers`` also the toolkit pipeline's images/s per number of workers
  (``per_worker``).
* ``teacher_step`` (not in the default run; part of the GPU matrix): the toolkit's teacher
  step vs the same step in float32 NCHW, the seed's way; for information, never counted.

``--px PX`` runs the steps at that one size; ``--tiny`` is a dry run of the plumbing (32 px,
batch 4, one repeat, a tiny loader set, no target judged) for tests on the CPU. ``--amp auto`` is
the engine's ``_amp="auto"`` (bf16 on sm80+, fp16 on older GPUs, off on the CPU).

``--quick`` measures fewer repeats and sizes with the same semantics (a few minutes
on 2 CPU cores). The JSON is ``{name: {"ratio": baseline/ours, "ours", "baseline",
"unit", "setup", "target", "met", ...raw figures}}``; every entry carries the machine
and its load at the time it ran (``machine``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from raug.train.device import amp_dtype, resolve_device

if __package__:
    from . import bench_loader, bench_steps, common
    from .bench_channel_relation import bench as bench_channel_relation
else:
    import bench_loader
    import bench_steps
    import common
    from bench_channel_relation import bench as bench_channel_relation

ITEMS = ("channel_relation", "dkd_step", "ssd_kd_step", "loader", "teacher_step")
DEFAULT_ITEMS = ITEMS[:4]  # the CPU suite; teacher_step belongs to the GPU matrix (gpu.sh)
STEP_ITEMS = ("teacher_step", "dkd_step", "ssd_kd_step")
# CPU targets (toolkit vs seed-style on the CPU): they decide the exit code of a CPU run.
CPU_TARGETS = {"channel_relation": 10.0, "dkd_step": 1.5, "ssd_kd_step": 1.5, "loader": 3.0}
# The teacher step's line (at least the float32 NCHW step's speed) is for information only.
TARGETS = {**CPU_TARGETS, "teacher_step": 1.0}
# GPU targets: only the D-KD step with AMP + channels-last vs the seed-style float32 step
# (both sizes). A CUDA run's other entries keep the CPU target for information only
# (``counts: False``): a missed CPU target never fails a GPU run.
GPU_TARGETS = {"dkd_step": 2.5}


def counted_targets(opts: Options) -> dict[str, float]:
    """Targets that decide the exit code of a run with ``opts`` (by item)."""
    if not opts.judge:
        return {}
    if not opts.device.startswith("cuda"):
        return CPU_TARGETS
    return GPU_TARGETS if opts.amp is not None and opts.channels_last else {}


def item_of(name: str) -> str:
    """The item of an entry name (``dkd_step_224px`` -> ``dkd_step``)."""
    return next(i for i in ITEMS if name == i or name.startswith(f"{i}_"))


def apply_targets(results: dict[str, dict], opts: Options) -> None:
    """Judge every entry against the target of its device; mark whether it counts."""
    targets = counted_targets(opts)
    for name, entry in results.items():
        target = targets.get(item_of(name))
        entry["counts"] = target is not None
        if target is not None and target != entry["target"]:
            entry["target"] = target
            entry["met"] = bool(entry["ratio"] >= target)


def exit_code(results: dict[str, dict]) -> int:
    """1 when an entry that counts (``apply_targets``) missed its target, else 0."""
    return 0 if all(r["met"] for r in results.values() if r.get("counts", True)) else 1
STEPS_PER_EPOCH_32 = -(-bench_steps.EPOCH_IMAGES // 32)  # batches of 32 in one epoch


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run (``--quick`` or full); semantics are the same."""

    repeats: int
    warmup: int
    cr_repeats: int
    dkd_sizes: tuple[int, ...]
    ssd_sizes: tuple[int, ...]
    ssd_images: int
    growth_epochs: tuple[int, ...]
    growth_repeats: int
    scaling_batches: tuple[int, ...]
    scaling_px: int
    scaling_repeats: int
    projection_px: int
    loader_repeats: int
    loader_data: tuple[int, int, int] = (64, 1024, 288)  # images, originals' and cache's short side
    loader_px: int = 224
    loader_workers: tuple[int, ...] = ()  # the per-worker scan (none by default)
    batch: int = 32  # images per teacher / D-KD step


QUICK = Plan(repeats=3, warmup=1, cr_repeats=3, dkd_sizes=(128,), ssd_sizes=(128,),
             ssd_images=8, growth_epochs=(0, 1, 10), growth_repeats=1,
             scaling_batches=(32, 64), scaling_px=128, scaling_repeats=1,
             projection_px=128, loader_repeats=3)
# A dry run of the plumbing on the CPU (tests of gpu.sh): every code path, no useful figure.
TINY = Plan(repeats=1, warmup=0, cr_repeats=1, dkd_sizes=(32,), ssd_sizes=(32,),
            ssd_images=2, batch=4, growth_epochs=(0,), growth_repeats=1,
            scaling_batches=(8,), scaling_px=32, scaling_repeats=1,
            projection_px=32, loader_repeats=1, loader_data=(64, 64, 48), loader_px=32)
FULL = Plan(repeats=4, warmup=1, cr_repeats=5, dkd_sizes=(128, 224), ssd_sizes=(128, 224),
            ssd_images=8, growth_epochs=(0, 1, 10, 100), growth_repeats=2,
            scaling_batches=(32, 64, 128), scaling_px=224, scaling_repeats=2,
            projection_px=224, loader_repeats=5)


def at_px(plan: Plan, px: int | None) -> Plan:
    """``plan`` with every step, scaling and projection at the one size ``px`` (None: as is)."""
    if px is None:
        return plan
    return replace(plan, dkd_sizes=(px,), ssd_sizes=(px,), scaling_px=px, projection_px=px,
                   loader_px=px)


@dataclass(frozen=True)
class Options:
    """Device settings of the toolkit side (the seed-style side is always float32 NCHW)."""

    device: str
    amp: str | None
    channels_last: bool
    compile: bool
    extras: bool = True
    judge: bool = True  # False: no entry counts (a dry run)


def _entry_name(item: str, px: int, sizes: tuple[int, ...]) -> str:
    return item if px == sizes[0] else f"{item}_{px}px"


def run_channel_relation(plan: Plan, opts: Options) -> dict[str, dict]:
    """``bench_channel_relation.bench`` (a :func:`common.make_result` entry) at N=48, 7x7."""
    entry = bench_channel_relation(48, 2048, 7, opts.device, plan.cr_repeats)
    entry["setup"] = {**entry["setup"], "repeats": plan.cr_repeats}
    entry["machine"] = common.machine_info(opts.device)
    return {"channel_relation": entry}


def _step_setup(kind: str, images: int, px: int, opts: Options, plan: Plan) -> dict[str, Any]:
    return {
        kind: images, "px": px, "device": opts.device, "amp": opts.amp or "off",
        "channels_last": opts.channels_last, "compile": opts.compile,
        "repeats": plan.repeats, "warmup": plan.warmup,
    }


def _projection(entry: dict, images: int) -> dict[str, Any]:
    return {
        "ours": bench_steps.epoch_projection(entry["ours"], images),
        "baseline": bench_steps.epoch_projection(entry["baseline"], images),
    }


def _step_entries(item: str, prepare: Callable[..., bench_steps.Pair], kind: str, images: int,
                  sizes: tuple[int, ...], plan: Plan, opts: Options,
                  extend: Callable[[dict, bench_steps.Pair, int], None] | None = None,
                  ) -> dict[str, dict]:
    """One entry per size: prepare the pair (``prepare(images, px, device, ...)``), time it,
    keep the equality check and the epoch projection; ``extend(entry, pair, px)`` adds more."""
    out = {}
    for px in sizes:
        pair = prepare(images, px, opts.device, opts.channels_last, opts.amp, opts.compile)
        setup = _step_setup(kind, images, px, opts, plan)
        if kind == "images":
            setup["views"] = 4 * images  # SSD-KD: four rotations per image
        timings = bench_steps.time_pair(pair, plan.repeats, plan.warmup, opts.device,
                                        f"{item} {px}px")
        entry = common.make_result(
            timings, "s/step", setup, TARGETS[item],
            extra={"check": pair.check, "machine": common.machine_info(opts.device)},
        )
        entry["epoch_projection"] = _projection(entry, images)
        if extend is not None:
            extend(entry, pair, px)
        out[_entry_name(item, px, sizes)] = entry
        del pair
    return out


def run_teacher(plan: Plan, opts: Options) -> dict[str, dict]:
    """``teacher_step`` entries (batch ``plan.batch``, at the D-KD sizes)."""
    return _step_entries("teacher_step", bench_steps.prepare_teacher, "batch", plan.batch,
                         plan.dkd_sizes, plan, opts)


def run_dkd(plan: Plan, opts: Options) -> dict[str, dict]:
    """``dkd_step`` entries (one per size), hook growth on the first, scaling, projection."""

    def growth(entry: dict, pair: bench_steps.Pair, px: int) -> None:
        if px == plan.dkd_sizes[0] and opts.extras:
            ks = [1 + e * STEPS_PER_EPOCH_32 for e in plan.growth_epochs]
            entry["hook_growth"] = bench_steps.hook_growth(
                pair, ks, plan.growth_repeats, opts.device, STEPS_PER_EPOCH_32
            )

    return _step_entries("dkd_step", bench_steps.prepare_dkd, "batch", plan.batch,
                         plan.dkd_sizes, plan, opts, growth)


def run_ssd(plan: Plan, opts: Options) -> dict[str, dict]:
    """``ssd_kd_step`` entries, one per size."""
    return _step_entries("ssd_kd_step", bench_steps.prepare_ssdkd, "images", plan.ssd_images,
                         plan.ssd_sizes, plan, opts)


def run_loader(plan: Plan, opts: Options, data_dir: Path) -> dict[str, dict]:
    """``loader`` entry (data synthesized and prepared on first use), with the per-worker
    scan of ``plan.loader_workers`` (``per_worker``)."""
    data = bench_loader.prepare_data(data_dir, *plan.loader_data)
    entry = bench_loader.bench_loader(data, img_size=plan.loader_px, repeats=plan.loader_repeats,
                                      device=opts.device)
    if plan.loader_workers:
        entry["per_worker"] = bench_loader.worker_scan(
            data, plan.loader_workers, img_size=plan.loader_px, repeats=plan.loader_repeats,
            device=opts.device)
    entry["machine"] = common.machine_info(opts.device)
    return {"loader": entry}


def add_scaling_and_projection(results: dict[str, dict], plan: Plan, opts: Options) -> None:
    """Scaling of the toolkit D-KD step with batch size and the per-epoch projections.

    Attached to the D-KD entry at ``plan.projection_px`` (``dkd_step`` in ``--quick``).
    """
    name = _entry_name("dkd_step", plan.projection_px, plan.dkd_sizes)
    if name not in results:
        return
    entry = results[name]
    entry["scaling"] = bench_steps.scaling(plan.scaling_batches, plan.scaling_px, opts.device,
                                           plan.scaling_repeats)
    teacher = bench_steps.teacher_step_time(32, plan.projection_px, opts.device, plan.repeats)
    projection = {
        "px": plan.projection_px,
        "teacher_ce": bench_steps.epoch_projection(teacher["s_per_step"], 32),
        "teacher_step": teacher,
        "d_kd": entry["epoch_projection"],
    }
    ssd_name = _entry_name("ssd_kd_step", plan.projection_px, plan.ssd_sizes)
    if ssd_name in results:
        projection["ssd_kd"] = results[ssd_name]["epoch_projection"]
    entry["epoch_projection"] = projection


def run_all(
    only: list[str], plan: Plan, opts: Options, data_dir: Path, report: Callable[[str], None]
) -> dict[str, dict]:
    """Run the selected items; returns ``{name: entry}`` (schema-checked)."""
    runners = {
        "channel_relation": lambda: run_channel_relation(plan, opts),
        "dkd_step": lambda: run_dkd(plan, opts),
        "ssd_kd_step": lambda: run_ssd(plan, opts),
        "loader": lambda: run_loader(plan, opts, data_dir),
        "teacher_step": lambda: run_teacher(plan, opts),
    }
    results: dict[str, dict] = {}
    for item in tqdm(only, desc="benchmarks", unit="item"):
        report(f"[{item}] load {common.load_average()}")
        results.update(runners[item]())
    if "dkd_step" in only and opts.extras:
        add_scaling_and_projection(results, plan, opts)
    apply_targets(results, opts)
    for name, entry in results.items():
        common.check_result(name, entry)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and sizes (minutes)")
    size.add_argument("--tiny", action="store_true",
                      help="dry run of every code path at 32 px on tiny data; judges no target")
    p.add_argument("--px", type=int, default=None, help="run the steps at this one size only")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("--only", nargs="+", choices=ITEMS, default=list(DEFAULT_ITEMS), metavar="NAME",
                   help=f"items to run, of {' '.join(ITEMS)} (default: {' '.join(DEFAULT_ITEMS)})")
    p.add_argument("--amp", choices=["off", "auto", "bf16", "fp16"], default="off",
                   help="toolkit side AMP, as the engine's _amp (bf16/fp16 on CUDA, bf16 on CPU; "
                        "auto: bf16 on sm80+, fp16 on older GPUs, off on the CPU)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="toolkit side without channels-last (engine _channels_last=False)")
    p.add_argument("--compile", action="store_true", help="torch.compile the toolkit side (CUDA)")
    p.add_argument("--skip-extras", action="store_true",
                   help="ratios only: no hook growth, batch scaling or epoch projection")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--data-dir", type=Path, default=bench_loader.DEFAULT_DATA_DIR,
                   help="synthetic data of the loader item (created on first use)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[], metavar="N",
                   help="loader item: also the toolkit pipeline's images/s with N workers, each N")
    p.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the GPU matrix of these result files (benchmarks/gpu.sh) and exit")
    return p


def amp_name(amp: str, device: str) -> str | None:
    """The autocast precision ``--amp`` gives on ``device`` (``auto`` resolved): bf16, fp16 or None."""
    dtype = amp_dtype(None if amp == "off" else amp, torch.device(device))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def format_details(results: dict[str, dict]) -> str:
    """Markdown tables of the raw figures: runs, checks, hook growth, scaling, projection."""
    out = ["| item | ours runs | baseline runs | unit | load (1, 5, 15 min) | loss rel. diff |",
           "|---|---|---|---|---|---|"]
    for name, r in results.items():
        check = r.get("check", {}).get("rel_diff", r.get("rel_diff"))
        out.append(f"| {name} | {_runs(r['ours_runs'])} | {_runs(r['baseline_runs'])} | "
                   f"{r['unit']} | {r.get('machine', {}).get('loadavg', '-')} | "
                   f"{'-' if check is None else f'{check:.1e}'} |")
    dkd = results.get("dkd_step", {})
    if "hook_growth" in dkd:
        out += ["", "| step k | epochs before | hooks per network | seed s/step | toolkit s/step | ratio |",
                "|---|---|---|---|---|---|"]
        out += [f"| {g['k']} | {g['epochs']:g} | {g['hooks_per_network']} | {g['baseline_s']:.2f} | "
                f"{g['ours_s']:.2f} | {g['ratio']:.2f}x |" for g in dkd["hook_growth"]]
    for r in results.values():
        if "scaling" in r:
            out += ["", "| batch | px | toolkit D-KD s/step | s/image | peak memory MiB |",
                    "|---|---|---|---|---|"]
            out += [f"| {s['batch']} | {s['px']} | {s['s_per_step']:.2f} | {s['s_per_image']:.3f} | "
                    f"{s['peak_mib']:.0f} |" for s in r["scaling"]]
        proj = r.get("epoch_projection", {})
        if "teacher_ce" in proj:
            out += ["", f"| method ({proj['px']} px) | toolkit s/image | toolkit epoch h | "
                        "seed-style s/image | seed-style epoch h |", "|---|---|---|---|---|"]
            t = proj["teacher_ce"]
            out.append(f"| teacher CE | {t['s_per_image']:.3f} | {t['epoch_h']:.2f} | - | - |")
            for method in ("d_kd", "ssd_kd"):
                if method in proj:
                    o, b = proj[method]["ours"], proj[method]["baseline"]
                    out.append(f"| {method} | {o['s_per_image']:.3f} | {o['epoch_h']:.2f} | "
                               f"{b['s_per_image']:.3f} | {b['epoch_h']:.2f} |")
    return "\n".join(out)


def variant(setup: dict) -> str:
    """The matrix row of a step entry: fp32 / AMP <dtype>, then + channels-last, + compile."""
    name = "fp32" if setup["amp"] == "off" else f"AMP {setup['amp']}"
    return name + " + channels-last" * bool(setup["channels_last"]) + " + compile" * bool(
        setup["compile"])


def images_per_s(entry: dict, side: str) -> float:
    """Training images per second of one side (``ours``/``baseline``) of a step entry."""
    setup = entry["setup"]
    return setup.get("batch", setup.get("images")) / entry[side]


def matrix_summary(runs: list[dict[str, dict]]) -> str:
    """Markdown: images/s of teacher, D-KD and SSD-KD steps per precision variant, the
    seed-style float32 steps, the loader per worker count, and whether the loader keeps
    up with the fastest D-KD step. ``runs``: the JSON results of ``gpu.sh``'s runs."""
    rows: dict[tuple[str, int], dict[str, float]] = {}
    seed: dict[str, list[float]] = {}
    for results in runs:
        for name, entry in results.items():
            item = item_of(name)
            if item in STEP_ITEMS:
                row = rows.setdefault((variant(entry["setup"]), entry["setup"]["px"]), {})
                row[item] = images_per_s(entry, "ours")
                row[f"{item}_ratio"] = entry["ratio"]
                seed.setdefault(item, []).append(images_per_s(entry, "baseline"))

    def cell(row: dict, item: str) -> str:
        return f"{row[item]:.1f}" if item in row else "-"

    out = ["| variant | px | teacher img/s | D-KD img/s | SSD-KD img/s | D-KD vs seed fp32 |",
           "|---|---|---|---|---|---|"]
    for (name, px), row in rows.items():
        ratio = f"{row['dkd_step_ratio']:.2f}x" if "dkd_step" in row else "-"
        out.append(f"| {name} | {px} | {cell(row, 'teacher_step')} | {cell(row, 'dkd_step')} | "
                   f"{cell(row, 'ssd_kd_step')} | {ratio} |")
    seed_row = {item: common.median(values) for item, values in seed.items()}
    out.append(f"| seed-style fp32 NCHW (median of the runs) | - | {cell(seed_row, 'teacher_step')} | "
               f"{cell(seed_row, 'dkd_step')} | {cell(seed_row, 'ssd_kd_step')} | 1.00x |")
    scans = [r["loader"]["per_worker"] for r in runs if "per_worker" in r.get("loader", {})]
    if scans:
        out += ["", "| loader workers | images/s | images/s per worker |", "|---|---|---|"]
        out += [f"| {w['workers']} | {w['images_per_s']:.1f} | {w['images_per_s_per_worker']:.1f} |"
                for w in scans[-1]]
        best = max(scans[-1], key=lambda w: w["images_per_s"])
        dkd = [row["dkd_step"] for row in rows.values() if "dkd_step" in row]
        if dkd:
            verdict = "keeps up with" if best["images_per_s"] >= max(dkd) else "is slower than"
            out += ["", f"loader with {best['workers']} workers: {best['images_per_s']:.1f} "
                        f"images/s, {verdict} the fastest D-KD step ({max(dkd):.1f} images/s)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print the tables, write the JSON."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.summarize:
        print(matrix_summary([json.loads(path.read_text()) for path in args.summarize]))
        return 0
    device = str(resolve_device(args.device))
    opts = Options(device, amp_name(args.amp, device), args.channels_last,
                   args.compile, extras=not args.skip_extras, judge=not args.tiny)
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    plan = replace(at_px(plan, args.px), loader_workers=tuple(args.loader_workers))
    only = [item for item in ITEMS if item in args.only]
    results = run_all(only, plan, opts, args.data_dir, lambda msg: tqdm.write(msg))
    info = common.machine_info(device)
    print(f"\nmachine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}"
          f" ({info['torch_threads']} threads), device {device}, load {info['loadavg']}")
    print(common.format_table(results))
    print()
    print(format_details(results))
    if args.json is not None:
        common.write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())

"""Deployment benchmark: size and batch-1 CPU latency of teacher and student, fp32 vs int8.

For ResNet-50 (teacher) and MobileNet-V2 (student) at 224 px, 8 classes:

* eager PyTorch fp32 (``torch.inference_mode``), 1 thread and all threads;
* ONNX fp32, ONNX int8 (static QDQ, calibrated on synthetic dermoscopy-like images) and,
  for comparison, dynamic int8, in onnxruntime, ``intra_op_num_threads=1`` and the default;
* bytes on disk (state dict / ONNX file), parameter count, and the int8-vs-fp32 top-1
  agreement on held-out synthetic images.

Latency is the median of ``--runs`` timed calls. The configurations of both models are
timed in blocks (``--warmup`` untimed calls, then a third of the timed ones) and the blocks
rotate over all configurations three times, so drifting background load on a shared
machine affects them alike. Without
``--student-checkpoint`` / ``--teacher-checkpoint`` the networks are random-weight stand-ins
(:func:`raug.deploy.synthetic.demo_model`): sizes and latencies are those of the real
architectures, but the int8 agreement of a random network is a pessimistic proxy.

Usage::

    python benchmarks/bench_deploy.py [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from raug.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raug.deploy.export import export_onnx
from raug.deploy.onnx_backend import make_session
from raug.deploy.quantize import quantize_onnx
from raug.deploy.spec import INPUT_NAME
from raug.deploy.synthetic import demo_model, synthetic_batch
from raug.deploy.torch_backend import load_model
from raug.files.atomic import atomic_write_text
from raug.files.checkpoint import save_checkpoint

CLASSES = ["AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]
IMG_SIZE = 224
ARCHS = (("teacher", "resnet-50"), ("student", "mobilenet"))


FORMATS = ("eager_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_dynamic")


def torch_runner(model: torch.nn.Module, x: np.ndarray, threads: int) -> Callable[[], object]:
    """One eager PyTorch call with ``threads`` intra-op threads (set before the clock starts)."""
    xt = torch.from_numpy(x)

    def run() -> object:
        with torch.inference_mode():
            return model(xt)

    run.threads = threads  # type: ignore[attr-defined]
    return run


def ort_runner(path: Path, x: np.ndarray, threads: int | None) -> Callable[[], object]:
    """One onnxruntime call (``threads=None``: its default, all cores)."""
    session = make_session(path, "cpu", intra_op_threads=threads)
    return lambda: session.run(None, {INPUT_NAME: x})


def rotated_block_medians(
    runners: dict[str, Callable[[], object]], warmup: int, runs: int, rounds: int = 3
) -> dict[str, float]:
    """Median milliseconds per runner, timed in blocks that rotate over the runners.

    Each configuration runs in a block (``warmup`` untimed calls, then its share of the
    timed calls) so it reaches its steady state; alternating single calls would let
    onnxruntime's spinning worker threads and PyTorch's OpenMP pool fight over the 2 cores.
    The blocks are repeated for ``rounds`` rounds so that drifting background load on a
    shared machine hits every configuration alike.
    """
    default_threads = torch.get_num_threads()
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {key: [] for key in runners}
    bar = tqdm(total=rounds * len(runners), desc="timing", file=sys.stderr)
    try:
        for _ in range(rounds):
            for key, run in runners.items():
                torch.set_num_threads(getattr(run, "threads", default_threads))
                time.sleep(0.2)  # let the previous runtime's threads go idle
                for _ in range(warmup):
                    run()
                for _ in range(per_round):
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
                bar.update()
    finally:
        torch.set_num_threads(default_threads)
        bar.close()
    return {key: 1000.0 * statistics.median(values) for key, values in times.items()}


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other jobs on the machine distort timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def build_model(role: str, name: str, ckpt: str | None, work: Path, args: argparse.Namespace) -> dict:
    """Export and quantise one architecture; return its figures and its timing runners."""
    n_images = 16 if args.quick else 48
    if ckpt is None:
        model = demo_model(name, len(CLASSES), IMG_SIZE, seed=0, num_images=n_images)
        ckpt_path = save_checkpoint(
            work / f"{role}.pth",
            {
                "model_name": name,
                "num_classes": len(CLASSES),
                "class_names": CLASSES,
                "img_size": IMG_SIZE,
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "model_state_dict": model.state_dict(),
                "epoch": 0,
                "config": {},
                "metrics": {},
            },
        )
    else:
        ckpt_path = Path(ckpt)
    model, spec = load_model(ckpt_path, "cpu")
    state_path = work / f"{role}_state_dict.pt"
    torch.save(model.state_dict(), state_path)
    onnx_path = work / f"{role}.onnx"
    export_diff = export_onnx(model, spec, onnx_path)
    size = spec.img_size
    calib = synthetic_batch(16 if args.quick else 64, size, spec.mean, spec.std, seed=100)
    held_out = synthetic_batch(16 if args.quick else 64, size, spec.mean, spec.std, seed=200)
    static = quantize_onnx(onnx_path, work / f"{role}.int8.onnx", calib, compare_inputs=held_out)
    dynamic = quantize_onnx(onnx_path, work / f"{role}.dyn.int8.onnx", compare_inputs=held_out)
    x = held_out[:1]
    cores = os.cpu_count() or 1
    files = {"onnx_fp32": onnx_path, "onnx_int8": static.path, "onnx_int8_dynamic": dynamic.path}
    runners = {
        f"{role}/eager_fp32/1_thread": torch_runner(model, x, 1),
        f"{role}/eager_fp32/all_threads": torch_runner(model, x, cores),
    }
    for fmt, path in files.items():
        runners[f"{role}/{fmt}/1_thread"] = ort_runner(path, x, 1)
        runners[f"{role}/{fmt}/all_threads"] = ort_runner(path, x, None)
    figures = {
        "model_name": spec.model_name,
        "weights": "checkpoint" if ckpt else "random stand-in (demo_model)",
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": {
            "eager_fp32": state_path.stat().st_size,
            "onnx_fp32": onnx_path.stat().st_size,
            "onnx_int8": static.int8_bytes,
            "onnx_int8_dynamic": dynamic.int8_bytes,
        },
        "onnx_export_max_abs_diff": export_diff,
        "int8_vs_fp32": {
            "top1_agreement": static.top1_agreement,
            "max_prob_diff": static.max_prob_diff,
            "num_images": static.num_compared,
            "num_calibration": static.num_calibration,
        },
        "int8_dynamic_vs_fp32": {
            "top1_agreement": dynamic.top1_agreement,
            "max_prob_diff": dynamic.max_prob_diff,
            "num_images": dynamic.num_compared,
        },
    }
    return {"figures": figures, "runners": runners}


def table(results: dict) -> str:
    """Plain-text summary table."""
    lines = [
        f"{'model':<22}{'format':<19}{'size MB':>9}{'1 thread ms':>13}{'all threads ms':>16}",
        "-" * 79,
    ]
    for role, res in results["models"].items():
        for fmt in FORMATS:
            lat = res["latency_ms"][fmt]
            lines.append(
                f"{role + ' ' + res['model_name']:<22}{fmt:<19}{res['bytes'][fmt] / 1e6:>9.1f}"
                f"{lat['1_thread']:>13.1f}{lat['all_threads']:>16.1f}"
            )
        agree = res["int8_vs_fp32"]
        lines.append(
            f"  {res['params']:,} params; int8 (static) vs fp32 top-1 agreement "
            f"{agree['top1_agreement']:.1%} on {agree['num_images']} images "
            f"(max prob diff {agree['max_prob_diff']:.3f}); dynamic "
            f"{res['int8_dynamic_vs_fp32']['top1_agreement']:.1%}"
        )
    for key, value in results["speedups"].items():
        lines.append(f"{key}: {value:.1f}x")
    return "\n".join(lines)


def speedups(models: dict) -> dict:
    """The ratios the deployment targets are stated in (per thread setting)."""
    out = {}
    student, teacher = models["student"]["latency_ms"], models["teacher"]["latency_ms"]
    for threads in ("1_thread", "all_threads"):
        int8 = student["onnx_int8"][threads]
        out[f"int8 student vs eager fp32 student ({threads})"] = student["eager_fp32"][threads] / int8
        out[f"int8 student vs eager fp32 teacher ({threads})"] = teacher["eager_fp32"][threads] / int8
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer images and runs (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 30, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 5, quick 2)")
    parser.add_argument("--teacher-checkpoint", help="use a trained teacher instead of a stand-in")
    parser.add_argument("--student-checkpoint", help="use a trained student instead of a stand-in")
    args = parser.parse_args(argv)
    args.runs = args.runs or (5 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    results: dict = {"machine": machine(), "load_average_start": load_average(), "models": {}}
    results["settings"] = {
        "img_size": IMG_SIZE, "batch": 1, "runs": args.runs, "warmup": args.warmup, "rounds": 3
    }
    ckpts = {"teacher": args.teacher_checkpoint, "student": args.student_checkpoint}
    runners: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for role, name in tqdm(ARCHS, desc="export + quantise", file=sys.stderr):
            built = build_model(role, name, ckpts[role], Path(tmp), args)
            results["models"][role] = built["figures"]
            runners.update(built["runners"])
        medians = rotated_block_medians(runners, args.warmup, args.runs)
    for key, value in medians.items():
        role, fmt, threads = key.split("/")
        results["models"][role].setdefault("latency_ms", {}).setdefault(fmt, {})[threads] = value
    results["speedups"] = speedups(results["models"])
    results["load_average_end"] = load_average()
    print(table(results))
    print(f"load average start {results['load_average_start']}, end {results['load_average_end']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

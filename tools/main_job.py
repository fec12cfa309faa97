"""The main job: the whole pipeline on the built-in synthetic ISIC 2019 data.

Steps (each skipped when already done, so a rerun finishes an interrupted job):

1. synthesize an official-format ISIC 2019 dataset (``data/ISIC2019/synthesize.py``);
2. prepare it (``run_preprocess.sh``: merge, split, folds, resized image cache);
3. teacher ResNet-50 (``isic.py``);
4. MobileNet-V2 student alone (``isic_d_kd.py`` with ``_kd_method="none"``);
5. D-KD student (``isic_d_kd.py`` with ``_kd_method="d_kd"``);
6. SSD-KD student (``isic_ssd_kd.py``);
7. a comparison table read back from the Sacred runs (markdown, CSV, PNG chart).

Usage: ``bash tools/main.sh [--out results/main] [--data data/synthetic] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "experiment" / "isic"

# Sized for about 11 minutes on 2 idle CPU cores (see README "Results of the main job").
# 40 images per rare class keep the per-class test metrics from resting on 1-2 images.
DATASET = {"num_images": 1000, "min_per_class": 40, "image_size": 96, "seed": 2019, "prep_size": 72}
# Loader workers would compete with torch's threads for the 2 cores: load in-process.
COMMON = ["_img_size=64", "_device={device}", "_num_workers=0", "seed=0"]
STEPS = {
    "teacher ResNet-50": ("isic.py", ["_epochs=18", "_batch_size=32", "_lr_init=0.002",
                                      "_early_stop=6", "_sched_patience=2"]),
    "student alone": ("isic_d_kd.py", ['_kd_method="none"', "_epochs=8", "_batch_size=32"]),
    "D-KD student": ("isic_d_kd.py", ['_kd_method="d_kd"', "_lambd_drkd=1", "_lambd_crkd=1000",
                                      "_epochs=8", "_batch_size=32"]),
    "SSD-KD student": ("isic_ssd_kd.py", ['_kd_method="ssd_kd"', "_lambd_drkd=1", "_lambd_crkd=1000",
                                          "_epochs=8", "_batch_size=16", "_epochs_tune=3"]),
}
FOLDERS = {
    "teacher ResNet-50": "teacher",
    "student alone": "student_none",
    "D-KD student": "student_d_kd",
    "SSD-KD student": "student_ssd_kd",
}


def banner(text: str) -> None:
    """A visible step header."""
    print(f"\n=== {text} ===", flush=True)


def run(cmd: list[str]) -> None:
    """Run a command, streaming its output; stop the job on failure."""
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"main job: step failed (exit {result.returncode}): {' '.join(cmd)}")


def completed(save_folder: Path) -> bool:
    """True when ``save_folder`` holds a COMPLETED Sacred run."""
    from raug.report.runs import load_runs

    if not save_folder.is_dir():
        return False
    runs = load_runs([save_folder])
    return bool((runs.get("status") == "COMPLETED").any()) if not runs.empty else False


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline; print and save the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic",
                        help="where the synthetic dataset is written and prepared")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "main",
                        help="where the four runs and the comparison go")
    parser.add_argument("--device", default="cpu", help="_device of every run (cpu, cuda, auto)")
    args = parser.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    start = time.perf_counter()

    banner("1/7 synthesize an ISIC 2019-format dataset")
    if (data / "ISIC_2019_Training_GroundTruth.csv").is_file():
        print(f"reusing {data}")
    else:
        run([sys.executable, "data/ISIC2019/synthesize.py", "--root", str(data),
             "--num-images", str(DATASET["num_images"]), "--image-size", str(DATASET["image_size"]),
             "--seed", str(DATASET["seed"]), "--min-per-class", str(DATASET["min_per_class"])])

    banner("2/7 prepare it (run_preprocess.sh)")
    # idempotent: a rerun checks the outputs and redoes no finished image work
    run(["bash", "run_preprocess.sh", "--root", str(data), "--size", str(DATASET["prep_size"])])

    teacher_ckpt = out / FOLDERS["teacher ResNet-50"] / "best-checkpoint" / "best-checkpoint.pth"
    for i, (label, (script, overrides)) in enumerate(STEPS.items(), start=3):
        save = out / FOLDERS[label]
        banner(f"{i}/7 {label} ({script})")
        if completed(save):
            print(f"already COMPLETED in {save}: skipped")
            continue
        cmd = [sys.executable, str(SCRIPTS / script), "with", *overrides,
               *(c.format(device=args.device) for c in COMMON),
               f"_base_path={data}", f"_save_folder={save}"]
        cmd.append("_pretrained=False")  # no ImageNet weights offline: train from scratch
        if script != "isic.py":
            cmd.append(f"_teacher_ckpt={teacher_ckpt}")
        if (save / "last-checkpoint" / "last-checkpoint.pth").is_file():
            cmd.append("_resume=True")  # an interrupted step continues where it stopped
        run(cmd)

    banner("7/7 comparison (read back from the Sacred runs)")
    from raug.report.compare import comparison_frame, to_markdown, write_comparison
    from raug.report.runs import load_runs

    frame = comparison_frame(load_runs([out]), {k: out / v for k, v in FOLDERS.items()})
    paths = write_comparison(frame, out)
    print(to_markdown(frame))
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    print(f"main job finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

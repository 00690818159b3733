"""How sharp a teacher is: max logit minus median logit over the training rows (issue 28).

    python docs/results/teacher_sharpness.py RUN_DIR [RUN_DIR ...] --data-root data

Prints, per run, the mean and the 95th percentile of the gap between each training image's
largest and median logit (numpy's median of 10 classes: the mean of the 5th and 6th), over
all 60,000 training images of Fashion-MNIST, the same preprocessing ``kdpipe evaluate`` uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kdpipe as kd
import numpy as np
import torch


def logit_gaps(run_dir: str, data_root: str) -> np.ndarray:
    run = kd.load_run(run_dir)
    train = kd.load_dataset("fashion-mnist", "train", data_root=Path(data_root))
    with torch.no_grad():
        logits = torch.cat([run.predict(train.images[i : i + 1000])
                            for i in range(0, len(train), 1000)]).double().numpy()  # fmt: skip
    return logits.max(axis=1) - np.median(logits, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    for run_dir in args.runs:
        gaps = logit_gaps(run_dir, args.data_root)
        print(f"{run_dir}: mean {gaps.mean():.2f}  p95 {np.percentile(gaps, 95):.2f}  "
              f"rows {len(gaps)}")  # fmt: skip


if __name__ == "__main__":
    main()

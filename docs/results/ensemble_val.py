"""Members and their ensemble on the validation rows and the test split (issue 28.3).

    python docs/results/ensemble_val.py RUN_DIR [RUN_DIR ...] --data-root data

Prints each member's errors on the validation rows that ``--val-fraction 0.1`` holds out
(``data.datasets.validation_rows``: the members must have been trained with it, so these rows
are unseen) and on the 10,000 test images, then the same for the ensemble: the arithmetic
mean of the members' probabilities, as ``cache-teacher --combine mean-probs`` makes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kdpipe as kd
import torch
from kdpipe.data.datasets import validation_rows


def probabilities(run_dir: str, images: torch.Tensor) -> torch.Tensor:
    run = kd.load_run(run_dir)
    with torch.no_grad():
        return torch.cat([run.predict(images[i : i + 1000]).softmax(1)
                          for i in range(0, len(images), 1000)])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args()
    root = Path(args.data_root)
    train = kd.load_dataset("fashion-mnist", "train", data_root=root)
    test = kd.load_dataset("fashion-mnist", "test", data_root=root)
    rows = torch.from_numpy(validation_rows(len(train), args.val_fraction))
    splits = {"val": (train.images[rows], train.labels[rows]), "test": (test.images, test.labels)}
    totals = {name: 0.0 for name in splits}
    for run_dir in args.runs:
        line = []
        for name, (images, labels) in splits.items():
            probs = probabilities(run_dir, images)
            totals[name] = totals[name] + probs
            line.append(f"{name} {int((probs.argmax(1) != labels).sum())}")
        print(f"{run_dir}: " + "  ".join(line))
    line = [f"{name} {int((totals[name].argmax(1) != labels).sum())}"
            for name, (_, labels) in splits.items()]  # fmt: skip
    print(f"ensemble of {len(args.runs)}: " + "  ".join(line))


if __name__ == "__main__":
    main()

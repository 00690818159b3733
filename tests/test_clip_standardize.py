"""--clip-grad/--clip-mode and --logit-standardize from the command line (issue 28): recorded
in config.json, rebuilt by report, refused with one line where they cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import fails, invoke, student
from kdpipe.tools.report import command_line


def test_options_are_recorded_and_rebuilt(train_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = student(train_cache, out, "--alpha 0.1 --temperature 20 --logit-standardize "
                                       "--clip-grad 2 --clip-mode value")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["clip_grad"], config["clip_mode"], config["logit_standardize"]) == (
        2.0, "value", True)  # fmt: skip
    line = command_line(config)
    assert "--logit-standardize --" in line or line.endswith("--logit-standardize")
    assert "--clip-grad 2.0 --clip-mode value" in line
    plain = command_line({**config, "logit_standardize": False, "clip_grad": None,
                          "clip_mode": "norm"})  # fmt: skip
    assert "standardize" not in plain and "clip" not in plain


def test_teacher_records_clipping(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    result = invoke("train-teacher --model kd_mlp_30x2 --data synthetic --epochs 1 "
                    "--clip-grad 0.5 --out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["clip_grad"], config["clip_mode"], config["logit_standardize"]) == (
        0.5, "norm", False)  # fmt: skip


def test_standardize_without_a_soft_term_is_one_line(train_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "hard"
    fails(student(train_cache, out, "--alpha 1 --logit-standardize"),
          "--logit-standardize changes the soft term")  # fmt: skip
    assert not out.exists()
    fails(invoke("train-student --model kd_mlp_30x2 --data synthetic --epochs 1 --alpha 0.5 "
                 "--clip-grad 0 --cache", train_cache, "--out", out),
          "--clip-grad", code=2)  # fmt: skip
    assert not out.exists()

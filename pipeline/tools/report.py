"""Result tables built only from what runs wrote: metrics.csv, model.json, config.json.

Nothing here is typed in by hand: every number in a generated table is read
from a run directory, and the commands shown are rebuilt from each run's saved
configuration. Runs whose directory names differ only by a trailing
``-s<seed>`` form one group, summarised as mean ± standard deviation.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from kdpipe.base.errors import KdpipeError, RunDirError, UsageError
from kdpipe.base.flags import COMMANDS, REQUIRED_TO_START, flag
from kdpipe.base.outputs import MARKDOWN, PNG, REPORT_CSV, guard_output, png_metadata
from kdpipe.cache import read_manifest
from kdpipe.models.runs import CONFIG_FILE, METRICS_FILE, ModelCard, read_card, read_config
from kdpipe.tools.bias import BIAS_FILE
from kdpipe.tools.publish import machine_line, publish
from kdpipe.tools.storage import stored_bytes_per_view
from kdpipe.train import TrainConfig
from kdpipe.train.config import LEGACY_DEFAULTS
from kdpipe.views.policy import CROP_SCALE

SEED_SUFFIX = re.compile(r"-s(\d+)$")


def _group_name(run_dir: Path) -> str:
    return SEED_SUFFIX.sub("", run_dir.name)


METRICS_COLUMNS = ("epoch", "test_accuracy", "test_errors", "seconds")


def _read_metrics(run_dir: Path) -> pd.DataFrame:
    """A run's metrics.csv, one row per epoch; a damaged file is one line naming it."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {METRICS_FILE}")
    try:
        metrics = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise RunDirError(f"{path} is empty: the run recorded no epoch there") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise RunDirError(f"{path} is not a readable metrics table ({reason})") from None
    missing = [name for name in METRICS_COLUMNS if name not in metrics]
    if missing:
        raise RunDirError(f"{path} lacks the column(s) {', '.join(missing)}: it is damaged or "
                          "not a kdpipe metrics.csv")  # fmt: skip
    metrics = metrics[pd.to_numeric(metrics["epoch"], errors="coerce").notna()]
    if metrics.empty:
        raise RunDirError(f"{path} has no epochs")
    return metrics.astype({"epoch": int})


def _final_result(run_dir: Path, card: ModelCard, config: dict,
                  metrics: pd.DataFrame) -> tuple[dict, str]:  # fmt: skip
    """The test result of the weights the run kept, and a note when metrics.csv disagrees.

    The result is what the run recorded as final in model.json (``result``); a card from
    before that record has the kept epoch (early stopping's choice, else the last epoch
    configured), whose row metrics.csv must still hold."""
    selection = card.selection or {}
    recorded = card.result
    epoch = selection.get("kept_epoch") or (recorded or {}).get("epoch") or \
        selection.get("epochs_run") or config.get("epochs")  # fmt: skip
    rows = metrics[metrics["epoch"] == epoch] if epoch is not None else metrics.iloc[-1:]
    row = rows.iloc[-1] if len(rows) else None
    if recorded is not None:
        if row is None:
            return recorded, f"{METRICS_FILE} lacks epoch {epoch}: the result is model.json's"
        if (int(row["test_errors"]) if pd.notna(row["test_errors"]) else None) != recorded[
            "test_errors"
        ]:
            return recorded, (f"{METRICS_FILE} disagrees with model.json at epoch {epoch}: "
                              "the result is model.json's")  # fmt: skip
        return recorded, ""
    if row is None or pd.isna(row["test_errors"]):
        raise RunDirError(
            f"{run_dir / METRICS_FILE} has no test result for epoch {epoch}, the run's final "
            f"(its rows end at epoch {int(metrics['epoch'].iloc[-1])}), and its model.json, "
            "older than the record of the result, holds none: re-score it with "
            f"`kdpipe evaluate {run_dir} --data DATA`"
        )
    return {"epoch": int(row["epoch"]), "test_accuracy": float(row["test_accuracy"]),
            "test_errors": int(row["test_errors"])}, ""  # fmt: skip


def command_line(config: dict, *, seed_placeholder: bool = False) -> str:
    """The kdpipe command that reproduces a run, rebuilt from its config.json.

    With ``seed_placeholder`` the seed reads ``SEED`` (and a ``-s<seed>`` suffix
    of ``--out`` reads ``-sSEED``): one line for every seed of a group.
    """
    if config.get("kind") == "qat-student":
        return _qat_command_line(config, seed_placeholder=seed_placeholder)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    command = COMMANDS.get(config.get("kind"), "train-teacher")
    parts = [f"kdpipe {command}"]
    required = set(REQUIRED_TO_START.get(command, ()))  # shown even at their defaults
    for name, default in defaults.items():
        value = config.get(name, LEGACY_DEFAULTS.get(name, default))  # an older config.json
        if isinstance(value, list):  # JSON has no tuples
            value = tuple(value)
        if seed_placeholder and name == "seed":
            value = "SEED"
        elif seed_placeholder and name == "out":
            value = SEED_SUFFIX.sub("-sSEED", str(value))
        elif seed_placeholder and name in ("cache", "teacher") and value is not None:
            # a chain's link of this seed: via-ta-s1 learns from ta-s1.zarr
            seeded = re.compile(rf"-s{config['seed']}(?=(\.zarr)?/?$)")
            value = seeded.sub("-sSEED", str(value))
        elif name == "overwrite" or value is None or (value == default and name not in required):
            continue
        if value is True:  # a flag (--logit-standardize) takes no value
            parts.append(flag(name))
            continue
        if isinstance(value, tuple):  # --crop-scale MIN MAX; --hidden-sizes 256,128
            value = (" " if name == "crop_scale" else ",").join(f"{v:g}" for v in value)
        parts.append(f"{flag(name)} {value}")
    return " ".join(parts)


def _qat_command_line(config: dict, *, seed_placeholder: bool) -> str:
    """``kdpipe qat`` from a QAT run's config.json (its ``qat`` entry: the QatConfig)."""
    from kdpipe.export.qat import QatConfig

    qat = config["qat"]
    defaults = {f.name: f.default for f in fields(QatConfig)}
    parts = [f"kdpipe qat {qat['run']}", f"--cache {qat['cache']}", f"--data {qat['data']}"]
    names = (
        "data_root",
        "epochs",
        "lr",
        "batch_size",
        "alpha",
        "temperature",
        "seed",
        "eval_every",
    )
    for name in names:
        value = "SEED" if seed_placeholder and name == "seed" else qat.get(name)
        if value is not None and (value != defaults[name] or name in ("epochs", "lr", "seed")):
            parts.append(f"--{name.replace('_', '-')} {value}")
    out = SEED_SUFFIX.sub("-sSEED", str(qat["out"])) if seed_placeholder else qat["out"]
    if seed_placeholder:
        parts[0] = f"kdpipe qat {SEED_SUFFIX.sub('-sSEED', str(qat['run']))}"
    return " ".join([*parts, f"--out {out}"])


def distinct_runs(run_dirs: Sequence[Path]) -> list[Path]:
    """Each run once, however it is spelled: ``runs/s``, ``runs/./s/``, an absolute path and
    a symlink are one folder, and a copy of a run (the same model.json: weights and time
    of creation) or of a cache (the same cache_id) is the same run; the first spelling
    given is kept."""
    seen: set[tuple] = set()
    kept = []
    for run_dir in map(Path, run_dirs):
        keys = {("folder", run_dir.resolve())}
        identity = _run_identity(run_dir)
        if identity is not None:
            keys.add(identity)
        if not keys & seen:
            kept.append(run_dir)
        seen |= keys
    return kept


def _run_identity(run_dir: Path) -> tuple | None:
    try:
        if (run_dir / "zarr.json").is_file():
            return ("cache", read_manifest(run_dir).cache_id)
        card = json.loads((run_dir / "model.json").read_text())
        return ("run", card["weights_sha256"], card["created"])
    except (KdpipeError, OSError, ValueError, KeyError, TypeError):
        return None  # collect names what is wrong with it


def collect(run_dirs: list[Path], evaluations: Sequence[Path] = ()) -> pd.DataFrame:
    """One row per run: what it is and the test result of the weights it kept (the last
    epoch's, or with early stopping the chosen epoch's). A cache of a labelled test split
    is a row too: its teacher's, or ensemble's, test result, as its pass measured it.
    ``evaluations`` (CSVs of ``kdpipe evaluate --per-class``) give runs without a
    tune-bias result their accuracy on the bias class (:func:`_seen_class_columns`)."""
    rows = []
    for run_dir in run_dirs:
        if (run_dir / "zarr.json").is_file():
            rows.append(_cache_row(run_dir))
            continue
        card = read_card(run_dir)
        if card.source is not None and not (run_dir / CONFIG_FILE).is_file():
            raise UsageError(_imported_teacher_problem(run_dir, card.source))
        config = read_config(run_dir)
        metrics = _read_metrics(run_dir)
        final, note = _final_result(run_dir, card, config, metrics)
        lineage = card.lineage or {}
        # with alpha = 1 no soft target is used: the cache only serves as lineage
        student = card.kind in ("student", "online-student", "qat-student")
        soft = student and lineage.get("alpha", 1.0) < 1.0
        runs = lineage.get("teacher_runs", [lineage.get("online_teacher")])
        teachers = [Path(p).name for p in runs if p] if soft else []
        rows.append(
            {
                "run": run_dir.name,
                "group": _group_name(run_dir),
                "kind": card.kind,
                "architecture": card.architecture,
                "teacher": "+".join(teachers) if teachers else "",
                "alpha": lineage.get("alpha") if student else None,
                "soft_labels": _soft_label_source(lineage, config) if soft else "",
                "temperature": lineage.get("temperature") if soft else None,
                "seed": config["seed"],
                "epochs": int(final["epoch"]),
                "epochs_run": int(
                    (card.selection or {}).get("epochs_run")
                    or max(final["epoch"], metrics["epoch"].iloc[-1])
                ),
                "train_rows": card.dataset.get("rows"),
                "test_accuracy": float(final["test_accuracy"]),
                "test_errors": int(final["test_errors"]),
                "test_samples": _test_samples(final),
                "seconds": float(metrics["seconds"].sum()),
                "cache": lineage.get("cache_path", ""),
                "feature": _feature_words(config),
                "cache_bytes_per_view": stored_bytes_per_view(lineage.get("cache_path")),
                "members": "",
                "note": note,
                **_bias_columns(run_dir),
                "command": command_line(
                    config, seed_placeholder=bool(SEED_SUFFIX.search(run_dir.name))
                ),
            }
        )
    return _seen_class_columns(pd.DataFrame(rows), run_dirs, evaluations)


def _imported_teacher_problem(run_dir: Path, source: dict) -> str:
    """Why an imported teacher (``import-teacher``: no config.json, no metrics.csv) is no
    report row, and the command that makes its test result one."""
    return (
        f"{run_dir} is a teacher imported from {source.get('source')} (import-teacher): it "
        "was not trained here, so it has no metrics.csv to report; its test result is a "
        "row as a cache of the test split: kdpipe cache-teacher --teacher "
        f"{run_dir} --data DATA --split test --temperature 1 --out {run_dir}-test.zarr, "
        f"then report {run_dir}-test.zarr"
    )


def _seen_class_columns(
    runs: pd.DataFrame, run_dirs: list[Path], evaluations: Sequence[Path]
) -> pd.DataFrame:
    """Runs that saw the class a tune-bias run left out are its control: their accuracy on
    that class, from their ``evaluate --per-class`` rows, is a measured row of the table."""
    if not evaluations:
        return runs
    if "bias_classes" not in runs or runs["bias_classes"].isna().all():
        raise UsageError("--class-accuracy needs a run with a tune-bias result in the report")
    classes = sorted({c for cs in runs["bias_classes"].dropna() for c in str(cs).split(",")})
    rows = pd.concat([pd.read_csv(path) for path in evaluations], ignore_index=True)
    columns = [f"class_{c}_accuracy" for c in classes]
    missing = [c for c in columns if c not in rows]
    if missing:
        raise UsageError(f"{', '.join(map(str, evaluations))} lack {', '.join(missing)}: "
                         "write them with `kdpipe evaluate RUN --per-class`")  # fmt: skip
    accuracy = {Path(r).resolve(): a for r, a in zip(rows["run"], rows[columns].mean(axis=1),
                                                     strict=True)}  # fmt: skip
    runs = runs.astype({"bias_classes": object})
    for index, run_dir in enumerate(run_dirs):
        measured = accuracy.get(Path(run_dir).resolve())
        if measured is not None and pd.isna(runs.at[index, "bias_classes"]):
            runs.at[index, "bias_classes"] = ",".join(classes)
            runs.at[index, "class_accuracy_before"] = float(measured)
    return runs


def _test_samples(row: pd.Series) -> int | None:
    """The size of the test split a metrics row scored, from its errors and accuracy."""
    accuracy, errors = float(row["test_accuracy"]), int(row["test_errors"])
    return round(errors / (1.0 - accuracy)) if accuracy < 1.0 and errors else None


def _bias_columns(run_dir: Path) -> dict:
    """What ``tune-bias`` wrote: the bias and the test split before and after it."""
    path = run_dir / BIAS_FILE
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text())
        before, after = result["test"]["before"], result["test"]["after"]
        return {
            "bias_classes": ",".join(map(str, result["classes"])),
            "bias": float(result["bias"]),
            "class_accuracy_before": before["class_accuracy"],
            "class_accuracy_after": after["class_accuracy"],
            "test_errors_after_bias": int(after["errors"]),
        }
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirError(f"{path} is not a tune-bias result ({exc!r})") from None


def _cache_row(path: Path) -> dict:
    """A test-split cache as a table row: the accuracy its teacher pass measured."""
    manifest = read_manifest(path)
    if (
        manifest.dataset["split"] != "test"
        or manifest.teacher_accuracy is None
        or manifest.num_views != 1
        or manifest.transfer["subset"] is not None
        or manifest.transfer["exclude_classes"]
    ):
        raise UsageError(
            f"{path} is a cache, and a report shows a cache only as its teacher's test "
            "result: a cache of every plain image of a labelled test split"
        )
    members = [Path(member.run_dir).name for member in manifest.teachers]
    errors = round((1.0 - manifest.teacher_accuracy) * manifest.num_samples)
    return {
        "run": path.name,
        "group": path.name.removesuffix(".zarr"),
        "kind": "ensemble" if len(members) > 1 else "teacher",
        "architecture": "+".join(dict.fromkeys(m.architecture for m in manifest.teachers)),
        "teacher": "",
        "alpha": None,
        "soft_labels": "",
        "temperature": None,
        "seed": None,
        "epochs": None,
        "epochs_run": None,
        "train_rows": None,
        "test_accuracy": manifest.teacher_accuracy,
        "test_errors": errors,
        "test_samples": manifest.num_samples,
        "seconds": cache_seconds(path) or math.nan,
        "cache": "",
        "feature": "",
        "cache_bytes_per_view": math.nan,
        "members": "+".join(members),
        "note": "",
        "command": cache_command(path) or "",
    }


def _feature_words(config: dict) -> str:
    """``hint features.7 → features.7, β 1``: a run's feature term, or "" without one."""
    loss = config.get("feature_loss")
    if not loss:
        return ""
    return (f"{loss} {config['student_layer']} → {config['teacher_layer']}, "
            f"β {config['feature_weight']:g}")  # fmt: skip


def _soft_label_source(lineage: dict, config: dict) -> str:
    """Where a student's soft targets came from, in a few words for a table."""
    if "online_teacher" in lineage:
        views = _view_words(config)
        return "online, plain images" if views == "none" else f"online, fresh {views} views"
    try:
        manifest = read_manifest(Path(lineage.get("cache_path", "")))
    except KdpipeError:
        return "cache (not found)"
    views = _view_words(manifest.views)
    storage = "" if manifest.storage["kind"] == "dense" else f", {manifest.layout.describe()}"
    if views == "none":
        return f"cache, fixed (1 plain view){storage}"
    return f"cache, {manifest.num_views} {views} views{storage}"


def _view_words(views: dict) -> str:
    """``shift-flip + mixup``, ``crop-flip (area 0.75-1)``: a view policy (a manifest's
    ``views`` or a run's config) in a few words."""
    words = views.get("augment", "none")
    scale = views.get("crop_scale")
    if words == "crop-flip" and scale is not None and tuple(scale) != CROP_SCALE:
        words += " (area {:g}-{:g})".format(*scale)
    if views.get("mix", "none") != "none":
        words += f" + {views['mix']}"
    return words


def summarize(runs: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """Mean ± std per group and, against ``baseline``, Hinton's gap-recovery share:
    (baseline errors − student errors) / (baseline errors − teacher errors), left empty
    where the teacher makes as many errors as the baseline or more (no gap to recover)."""
    groups = []
    for name, group in runs.groupby("group", sort=False):
        first = group.iloc[0]
        stopped = group["epochs"].notna() & (group["epochs"] != group["epochs_run"])
        summary = {
            "group": name,
            "kind": first["kind"],
            "architecture": first["architecture"],
            # a chain's seeds each learn from their own teacher: hard-s0, hard-s1 -> hard-sSEED
            "teacher": first["teacher"]
            if group["teacher"].nunique() == 1
            else SEED_SUFFIX.sub("-sSEED", first["teacher"]),
            "soft_labels": first["soft_labels"],
            "alpha": first["alpha"],
            "T": first["temperature"],
            "seeds": " ".join(str(int(s)) for s in sorted(group["seed"]) if pd.notna(s)),
            # early stopping: the epoch each seed kept, otherwise the epochs trained
            "epochs": (
                "kept " + " ".join(str(int(e)) for e in group.sort_values("seed")["epochs"])
                if stopped.any()
                else ("" if pd.isna(first["epochs"]) else str(int(first["epochs"])))
            ),
            "train_rows": first["train_rows"],
            "test_errors_mean": group["test_errors"].mean(),
            "test_errors_std": group["test_errors"].std(ddof=1) if len(group) > 1 else 0.0,
            "test_accuracy_mean": group["test_accuracy"].mean(),
            "test_samples": group["test_samples"].dropna().max(),
            "minutes_per_run": group["seconds"].mean() / 60,
            "feature": first.get("feature", ""),
            "cache_bytes_per_view": group["cache_bytes_per_view"].mean()
            if "cache_bytes_per_view" in group
            else math.nan,
            "note": "; ".join(dict.fromkeys(n for n in group.get("note", []) if n)),
        }
        if "class_accuracy_before" in group and group["class_accuracy_before"].notna().any():
            summary.update(
                bias_classes=first["bias_classes"],
                bias_mean=group["bias"].mean(),
                class_accuracy_before=group["class_accuracy_before"].mean(),
                class_accuracy_after=group["class_accuracy_after"].mean(),
                test_errors_after_bias=group["test_errors_after_bias"].mean(),
            )
        groups.append(summary)
    table = pd.DataFrame(groups)
    if baseline is not None:
        if baseline not in set(table["group"]):
            raise UsageError(
                f"--baseline {baseline!r} is not one of the groups: " + ", ".join(table["group"])
            )
        scratch = float(table.loc[table["group"] == baseline, "test_errors_mean"].iloc[0])
        errors_of = dict(zip(runs["run"], runs["test_errors"], strict=True))
        # an ensemble's test result is a cache row, named by its members
        errors_of.update(
            (members, errors)
            for members, errors in zip(runs["members"], runs["test_errors"], strict=True)
            if members
        )

        def recovery(row: pd.Series) -> float | None:
            teacher_errors = errors_of.get(row["teacher"])
            if row["kind"] == "teacher" or row["group"] == baseline or teacher_errors is None:
                return None
            if teacher_errors >= scratch:  # no gap to recover: the teacher is not better
                return None
            return (scratch - row["test_errors_mean"]) / (scratch - teacher_errors)

        def why_none(row: pd.Series) -> str:
            """Why a distilled group has no gap-recovery share: said, not left blank."""
            teacher_errors = errors_of.get(row["teacher"])
            if row["kind"] == "teacher" or row["group"] == baseline or not row["teacher"]:
                return ""
            if teacher_errors is None:
                return f"teacher {row['teacher']} is not in the report"
            if teacher_errors >= scratch:
                return (f"teacher no better than {baseline} ({teacher_errors:.0f} vs "
                        f"{scratch:.0f} test errors): no gap to recover")  # fmt: skip
            return ""

        table["gap_recovered"] = table.apply(recovery, axis=1)
        table["gap_note"] = table.apply(why_none, axis=1) if len(table) else []
    return table


def to_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "group": table["group"],
            "model": table["architecture"],
            "teacher": table["teacher"].replace("", "—"),
            "soft labels": table["soft_labels"].replace("", "—"),
            "α": _cells(table["alpha"], "{:g}"),
            "T": _cells(table["T"], "{:g}"),
            "seeds": table["seeds"].replace("", "—"),
            "epochs": table["epochs"].replace("", "—"),
            "train rows": _cells(table["train_rows"], "{:,.0f}"),
            _errors_header(table): [
                f"{m:.1f} ± {sd:.1f}" if len(seeds.split()) > 1 else f"{m:.0f}"
                for m, sd, seeds in zip(
                    table["test_errors_mean"], table["test_errors_std"], table["seeds"], strict=True
                )
            ],
            "test accuracy": table["test_accuracy_mean"].map(lambda v: f"{v:.4f}"),
            "minutes / run": _cells(table["minutes_per_run"], "{:.1f}"),
        }
    )
    if "feature" in table and (table["feature"].fillna("") != "").any():
        # beyond logits, what a cache holds is part of the result: its term and its bytes
        shown.insert(4, "feature term", table["feature"].fillna("").replace("", "—"))
        shown["cache bytes / sample-view"] = _cells(table["cache_bytes_per_view"], "{:,.0f}")
    if "bias_mean" in table:
        biased, measured = table["bias_mean"].notna(), table["class_accuracy_before"].notna()
        shown["class"] = table["bias_classes"].where(measured, "—")
        shown["class right, before bias"] = _percent(table["class_accuracy_before"], measured)
        shown["bias (on validation)"] = _cells(table["bias_mean"], "{:+.2f}")
        shown["class right, after bias"] = _percent(table["class_accuracy_after"], biased)
        shown["test errors after bias"] = _cells(table["test_errors_after_bias"], "{:.1f}")
    if "gap_recovered" in table:
        shown["gap recovered"] = _cells(table["gap_recovered"], "{:.0%}")
        if "gap_note" in table:
            why = table["gap_note"].fillna("") != ""
            shown.loc[why, "gap recovered"] = "none: " + table.loc[why, "gap_note"]
    if "note" in table and (table["note"].fillna("") != "").any():
        shown["note"] = table["note"].fillna("").replace("", "—")
    return shown.to_markdown(index=False, disable_numparse=True)  # cells are formatted


def _errors_header(table: pd.DataFrame) -> str:
    """``test errors (of 10,000)`` when every row scored one test split of that size."""
    sizes = set(table["test_samples"].dropna()) if "test_samples" in table else set()
    return f"test errors (of {int(sizes.pop()):,})" if len(sizes) == 1 else "test errors"


def temperature_plot(table: pd.DataFrame, path: Path) -> None:
    """Test errors against the distillation temperature, one line per student architecture
    (mean ± std over seeds), its hard-label group dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = table[table["kind"].isin(["student", "online-student"])]
    distilled = students[students["T"].notna()]
    if distilled.empty:
        raise UsageError("--temperature-plot needs distilled runs (alpha < 1) at some T")
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (architecture, runs) in enumerate(distilled.groupby("architecture", sort=False)):
        colour = f"C{index}"
        runs = runs.sort_values("T")
        axes.errorbar(
            runs["T"],
            runs["test_errors_mean"],
            yerr=runs["test_errors_std"],
            marker="o",
            capsize=3,
            color=colour,
            label=f"{architecture}, soft targets",
        )
        hard = students[(students["architecture"] == architecture) & students["T"].isna()]
        for _, row in hard.iterrows():
            axes.axhline(row["test_errors_mean"], color=colour, linestyle="--",
                         label=f"{architecture}, hard labels")  # fmt: skip
    axes.set_xscale("log")
    temperatures = sorted(distilled["T"].unique())
    axes.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
    axes.set_xlabel("temperature T (log scale)")
    axes.set_ylabel("test errors (of 10,000)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, metadata=png_metadata())
    plt.close(figure)


CURVES = {  # metrics.csv column -> the panel's title
    "test_errors": "test errors",
    "loss": "loss (backpropagated)",
    "hard_loss": "hard term: CE(labels)",
    "soft_loss": "soft term: KL (before T² and 1 − α)",
}


def training_curves(run_dirs: list[Path]) -> pd.DataFrame:
    """Every run's metrics.csv, one row per run and epoch, with its group (caches skipped)."""
    frames = []
    for run_dir in run_dirs:
        if (run_dir / "zarr.json").is_file():
            continue
        metrics = _read_metrics(run_dir)
        frames.append(metrics.assign(run=run_dir.name, group=_group_name(run_dir)))
    if not frames:
        raise UsageError("--plot draws training curves: give at least one run directory")
    return pd.concat(frames, ignore_index=True)


def curves_plot(run_dirs: list[Path], path: Path) -> None:
    """Test errors and each loss term against the epoch, one line per group (the mean over
    its seeds) with the seeds' range (min to max) shaded; a panel only where some run has
    values (a teacher has no soft term, an epoch without evaluation no test errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = training_curves(run_dirs)
    shown = [name for name in CURVES if curves[name].notna().any()]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for axis, name in zip(axes[0], shown, strict=True):
        for index, (group, runs) in enumerate(curves.groupby("group", sort=False)):
            by_epoch = runs.dropna(subset=[name]).groupby("epoch")[name]
            if by_epoch.ngroups == 0:
                continue
            spread = by_epoch.agg(["mean", "min", "max"])
            seeds = runs["run"].nunique()
            colour = f"C{index % 10}"
            axis.plot(spread.index, spread["mean"], color=colour,
                      marker="o" if len(spread) == 1 else None,
                      label=group if seeds == 1 else f"{group} ({seeds} seeds)")  # fmt: skip
            if seeds > 1:
                axis.fill_between(spread.index, spread["min"], spread["max"], color=colour,
                                  alpha=0.2, linewidth=0)  # fmt: skip
        axis.set_title(CURVES[name], fontsize=10)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, metadata=png_metadata())
    plt.close(figure)


def _cells(values: pd.Series, fmt: str) -> pd.Series:
    """Each value formatted with ``fmt``, or a dash where there is none."""
    return values.map(lambda v: "—" if v is None or pd.isna(v) else fmt.format(v))


def _percent(values: pd.Series, shown: pd.Series) -> pd.Series:
    return pd.Series(
        [f"{v:.1%}" if ok else "—" for v, ok in zip(values, shown, strict=True)], index=values.index
    )


def cache_command(path: Path) -> str | None:
    """The cache-teacher command that made a cache, rebuilt from its manifest."""
    from kdpipe.models.teach import CacheConfig

    try:
        manifest = read_manifest(path)
    except KdpipeError:
        return None
    parts = ["kdpipe cache-teacher"]
    parts += [f"--teacher {member.run_dir}" for member in manifest.teachers]
    parts += [
        f"--data {manifest.dataset['name']}",
        f"--split {manifest.dataset['split']}",
        f"--temperature {manifest.temperature:g}",
    ]
    if len(manifest.teachers) > 1:
        parts.append(f"--combine {manifest.combine}")
    views, transfer = manifest.views, manifest.transfer
    if manifest.num_views > 1:
        parts.append(f"--views {manifest.num_views}")
    if views["augment"] != "none":
        parts.append(f"--augment {views['augment']}")
    if "crop_scale" in views:
        parts.append("--crop-scale {:g} {:g}".format(*views["crop_scale"]))
    if views["mix"] != "none":
        parts.append(f"--mix {views['mix']} --mix-alpha {views['mix_alpha']:g}")
    if transfer["subset"] is not None:
        parts.append(f"--subset {transfer['subset']:g}")
    if transfer["exclude_classes"]:
        parts.append(f"--exclude-classes {','.join(map(str, transfer['exclude_classes']))}")
    if not transfer["labeled"]:
        parts.append("--ignore-labels")
    if manifest.seed:
        parts.append(f"--seed {manifest.seed}")
    if manifest.storage["k"] is not None:
        parts.append(f"--top-k {manifest.storage['k']}")
    default_chunk = next(f.default for f in fields(CacheConfig) if f.name == "chunk_size")
    if manifest.chunk_size != min(default_chunk, manifest.num_samples):
        parts.append(f"--chunk-size {manifest.chunk_size}")
    if manifest.dtype != "float16":
        parts.append(f"--dtype {manifest.dtype}")
    if manifest.precision != "float32":
        parts.append("--precision bf16")
    for kind, option in (("features", "--features"), ("attention", "--attention")):
        names = [layer.name for layer in manifest.features if layer.kind == kind]
        if names:
            parts.append(f"{option} {','.join(names)}")
    pooled = {layer.pooling for layer in manifest.features} - {"none"}
    if pooled:  # one --feature-grid for every layer: "adaptive-avg GxG"
        parts.append(f"--feature-grid {pooled.pop().split()[-1].split('x')[0]}")
    parts.append(f"--out {path}")
    return " ".join(parts)


def cache_seconds(path: Path) -> float | None:
    """How long a cache's teacher pass took, from its manifest's timestamps (whole seconds;
    a resumed pass counts from its first start)."""
    try:
        manifest = read_manifest(path)
    except KdpipeError:
        return None
    if manifest.completed is None:
        return None
    return (
        datetime.fromisoformat(manifest.completed) - datetime.fromisoformat(manifest.created)
    ).total_seconds()


def section_text(
    runs: pd.DataFrame, table: pd.DataFrame, figures: tuple[tuple[str, str], ...] = ()
) -> str:
    rebuilt = [runs[runs["group"] == group].iloc[0]["command"] for group in table["group"]]
    teachers = [c for c in rebuilt if c.startswith("kdpipe train-teacher")]
    caches = [cache_command(Path(p)) for p in dict.fromkeys(runs["cache"]) if p]
    students = [c for c in rebuilt if not c.startswith("kdpipe train-teacher")]
    commands = [*teachers, *(c for c in caches if c), *students]
    passes = [
        f"`{Path(p).name}` {seconds:.0f} s"
        for p in dict.fromkeys(runs["cache"])
        if p and (seconds := cache_seconds(Path(p))) is not None
    ]
    lines = [
        f"Generated by `kdpipe report` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the runs' "
        "own metrics.csv and model.json (test split, at the epoch each run kept: its last, or "
        "the one early stopping chose on the validation rows).",
        f"Machine: {machine_line()}.",
        "",
        to_markdown(table),
        "",
        *(line for alt, figure in figures for line in (f"![{alt}]({figure})", "")),
        *(
            [
                "Teacher passes (paid once per cache, not in the minutes above): "
                + ", ".join(passes)
                + ".",
                "",
            ]
            if passes
            else []
        ),
        "Commands (rebuilt from each run's config.json and each cache's manifest; `SEED` "
        "takes the seeds listed):",
        "",
        "```",
        *dict.fromkeys(commands),
        "```",
    ]
    return "\n".join(lines)


def report(
    run_dirs: list[Path],
    *,
    baseline: str | None = None,
    csv_path: Path | None = None,
    markdown_path: Path | None = None,
    section: str = "results",
    plot_path: Path | None = None,
    curves_path: Path | None = None,
    evaluations: Sequence[Path] = (),
    overwrite: bool = False,
) -> pd.DataFrame:
    """Collect runs, summarise them, and write the CSV, the Markdown section and the plots
    (``plot_path``: test errors against T; ``curves_path``: the training curves); an
    existing CSV or plot is replaced only with ``overwrite`` and only if kdpipe wrote it."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    run_dirs = distinct_runs(run_dirs)
    for option, path in (("--temperature-plot", plot_path), ("--plot", curves_path)):
        if path is not None and Path(path).suffix.lower() != ".png":
            raise UsageError(f"{option} {path}: the plot is a PNG; give a path ending in .png")
    for output, kind, option in ((csv_path, REPORT_CSV, "--csv"),
                                 (markdown_path, MARKDOWN, "--markdown"),
                                 (plot_path, PNG, "--temperature-plot"),
                                 (curves_path, PNG, "--plot")):  # fmt: skip
        if output is not None:  # never over a run's own files, nor over what kdpipe did not write
            guard_output(output, kind, overwrite=overwrite, inputs=[*run_dirs, *evaluations],
                         option=option)  # fmt: skip
    runs = collect([Path(p) for p in run_dirs], evaluations)
    table = summarize(runs, baseline)
    if plot_path is not None:
        temperature_plot(table, plot_path)
    if curves_path is not None:
        curves_plot([Path(p) for p in run_dirs], curves_path)
    figures = tuple(
        (alt, os.path.relpath(path, markdown_path.parent))
        for alt, path in (("training curves: test errors and loss terms against the epoch",
                           curves_path), ("test errors against the temperature T", plot_path))
        if path is not None and markdown_path is not None
    )  # fmt: skip
    publish(runs, csv_path=csv_path, markdown_path=markdown_path, section=section,
            text=lambda: section_text(runs, table, figures))  # fmt: skip
    return table

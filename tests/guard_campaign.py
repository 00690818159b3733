"""The output guard and the fingerprint framing under a sweep (``make faults``, issue 24).

Guard: every command that writes is given every dangerous output (``.``, ``..``, an
ancestor of the working directory by its absolute path, the data, a split of it, the
folder holding the inputs, each input, a folder and a file kdpipe never wrote, and a
kdpipe output of another kind), with and without ``--overwrite``, from a working
directory inside a sandbox. Each probe must end in one ``Error:`` line (no
traceback), and the sandbox's tree must be byte for byte what it was (a digest of every
path and every file's bytes before and after).

Framing: random pairs of unlabeled folders whose rows, written the old way
(``PATH\\tLABEL\\tSHA\\n`` joined), are the same bytes (names holding a tab, a digest and
a newline end one row and start the next); each pair must get two fingerprints.
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from kdpipe.cli import main
from kdpipe.data.datasets import load_dataset
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def run(*args: str) -> tuple[int, str]:
    """The CLI in-process (click's runner): exit code and everything it printed."""
    result = CliRunner().invoke(main, list(args))
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
    return result.exit_code, text


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def tree_digest(root: Path, leave_out: Path | None = None) -> str:
    """Every directory and file under ``root``, with each file's bytes: what must not change
    (``leave_out``, and all under it, not counted: the output a probe may replace)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if leave_out is not None and (path == leave_out or leave_out in path.parents):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            digest.update(f"D {rel}\n".encode())
        else:
            digest.update(f"F {rel} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def image_folder(root: Path, rng: np.random.Generator) -> Path:
    """train/ and test/ of three classes of 16 px greyscale PNGs (bright, mid, dark): one
    channel, as timm's kd_cnn_tiny expects, so that import-teacher can read its weights."""
    for split, count in (("train", 8), ("test", 4)):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (16, 16)).astype(np.uint8) + 90 * k
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    return root


def build_sandbox(root: Path) -> dict[str, Path]:
    """A user's project: data, a teacher, its cache, a student, its ONNX file, a folder and
    a file of the user's own, and the working directory ``project/work``."""
    project = root / "project"
    (project / "work").mkdir(parents=True)
    (project / "notes").mkdir()
    (project / "notes" / "thesis.txt").write_text("three years of work\n")
    data = image_folder(project / "data" / "imgs", np.random.default_rng(0))
    runs = project / "runs"
    steps = [
        f"train-teacher --model kd_cnn_tiny --data {data} --epochs 1 --out {runs / 'teacher'}",
        f"cache-teacher --teacher {runs / 'teacher'} --data {data} --temperature 4 "
        f"--out {runs / 't.zarr'}",
        f"train-student --model kd_cnn_tiny --cache {runs / 't.zarr'} --data {data} "
        f"--alpha 0.5 --epochs 1 --out {runs / 'student'}",
        f"export {runs / 'student'} --out {runs / 'student.onnx'}",
        f"evaluate {runs / 'student'} --data {data} --output {runs / 'eval.json'}",
    ]
    for step in steps:
        code, text = run(*shlex.split(step))
        if code:
            raise SystemExit(f"sandbox step failed: kdpipe {step}\n{text}")
    return {"project": project, "data": data, "runs": runs}


def dangerous_outputs(sandbox: dict[str, Path]) -> dict[str, str]:
    """What each probe passes as the output, spelled as a user might, from project/work."""
    project = sandbox["project"]
    return {
        "the working directory (.)": ".",
        "its parent (..)": "..",
        "an ancestor by absolute path": str(project.parent),
        "the working directory, spelled ../work/": "../work/",
        "the data": "../data/imgs",
        "a split of the data": "../data/imgs/train",
        "the folder holding the data": "../data",
        "the folder holding the inputs": "../runs",
        "the teacher (an input)": "../runs/teacher",
        "the cache (an input)": "../runs/t.zarr",
        "the student (an input)": "../runs/student",
        "a folder kdpipe never wrote": "../notes",
        "a file kdpipe never wrote": "../notes/thesis.txt",
        "an output of another kind (the ONNX file)": "../runs/student.onnx",
        "an output of another kind (evaluate's JSON)": "../runs/eval.json",
    }


def commands(data_root: Path | None) -> dict[str, str]:
    """Every command that writes, once per output option, that option last (the probe
    appends the path). Inputs are named relative to project/work; the commands that
    build from Fashion-MNIST are probed when ``data_root`` holds it (tiny counts: a probe
    that was not refused costs seconds)."""
    data, runs = "../data/imgs", "../runs"
    tiny = ("--teacher kd_cnn_tiny --student kd_cnn_tiny --epochs 3 --repeats 1 "
            "--batch-size 8")  # fmt: skip
    probes = {
        "train-teacher": f"train-teacher --model kd_cnn_tiny --data {data} --epochs 1 --out",
        "cache-teacher": f"cache-teacher --teacher {runs}/teacher --data {data} "
        "--temperature 4 --out",
        "train-student": f"train-student --model kd_cnn_tiny --cache {runs}/t.zarr --data "
        f"{data} --alpha 0.5 --epochs 1 --out",
        "distill-online": f"distill-online --teacher {runs}/teacher --model kd_cnn_tiny --data "
        f"{data} --alpha 0.5 --temperature 4 --epochs 1 --out",
        "import-teacher": f"import-teacher timm:kd_cnn_tiny --weights "
        f"{runs}/teacher/model.safetensors --input-size 16 --classes ../data/classes.txt --out",
        "qat": f"qat {runs}/student --cache {runs}/t.zarr --data {data} --epochs 1 --out",
        "export": f"export {runs}/student --out",
        "export --int8": f"export {runs}/student --int8 --out",
        "evaluate": f"evaluate {runs}/student --data {data} --output",
        "report --csv": f"report {runs}/student --csv",
        "report --plot": f"report {runs}/student --plot",
        "report --markdown": f"report {runs}/student --markdown",
        "storage --csv": f"storage {runs}/t.zarr --csv",
        "storage --markdown": f"storage {runs}/t.zarr --markdown",
        "pack-shards": f"pack-shards {data} --out",
        "bench-folder --out": f"bench-folder --folder {data} --small {data} {tiny} "
        "--image-size 16 --out",
        "bench-folder --csv": f"bench-folder --folder {data} --small {data} {tiny} "
        "--image-size 16 --out ../bench-work --csv",
    }
    if data_root is not None and (data_root / "fashion-mnist").is_dir():
        probes |= {
            "jpeg-folder": f"jpeg-folder --data-root {data_root} --train-count 3 "
            "--test-count 3 --dest",
            "detect-folder": f"detect-folder --data-root {data_root} --train-count 3 "
            "--val-count 2 --test-count 2 --dest",
            "bench --out": f"bench --data-root {data_root} --fraction 0.001 {tiny} --out",
            "bench --csv": f"bench --data-root {data_root} --fraction 0.001 {tiny} "
            "--out ../bench-work --csv",
        }
    return probes


# With --overwrite, the one output a command may replace: one of its own kind that
# kdpipe wrote and that is not among this command's inputs (train-student's inputs hold
# its cache's teacher, and so do qat's; import-teacher reads the teacher's weights file).
REPLACEABLE = {
    "train-teacher": {"../runs/teacher", "../runs/student"},
    "distill-online": {"../runs/student"},
    "train-student": {"../runs/student"},
    "import-teacher": {"../runs/student"},
    "cache-teacher": {"../runs/t.zarr"},
    "export": {"../runs/student.onnx"},
    "export --int8": {"../runs/student.onnx"},
    "evaluate": {"../runs/eval.json"},
}


def probe(root: Path, name: str, command: str, path: str, overwrite: bool) -> tuple[str, str]:
    """One probe, from the working directory: its verdict (``refused``, ``replaced``, or
    ``FAILED``) and what it printed. A refusal is one ``Error:`` line, no traceback, the
    tree unchanged; a replacement (only a REPLACEABLE output, with --overwrite) exits 0
    and changes nothing but that output."""
    allowed = overwrite and path in REPLACEABLE.get(name, set())
    target = (Path.cwd() / path).resolve()
    before = tree_digest(root, target if allowed else None)
    code, text = run(*shlex.split(f"{command} {shlex.quote(path)}"), *(["--overwrite"] * overwrite))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    after = tree_digest(root, target if allowed else None)
    if allowed:
        verdict = "replaced" if code == 0 and after == before and target.exists() else "FAILED"
    else:
        refused = (code != 0 and "Traceback" not in text and bool(lines)
                   and lines[-1].startswith("Error: "))  # fmt: skip
        verdict = "refused" if refused and after == before else "FAILED"
    return verdict, f"exit {code}, tree {'unchanged' if after == before else 'CHANGED'}: {text}"


def guard_campaign(work: Path, data_root: Path | None = None) -> dict:
    """Every command x every dangerous output x with and without --overwrite; after a
    probe that replaced its output, the sandbox is restored from a pristine copy."""
    root, pristine = work / "guard", work / "guard-pristine"
    sandbox = build_sandbox(root)
    (sandbox["project"] / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    shutil.copytree(root, pristine, symlinks=True)
    outputs = dangerous_outputs(sandbox)
    rows: dict[str, dict[str, int]] = {}  # command: probes, refused, replaced, FAILED
    failures: list[str] = []
    with working_directory(sandbox["project"] / "work"):
        for name, command in commands(data_root).items():
            counts = rows.setdefault(name, {"probes": 0, "refused": 0, "replaced": 0,
                                            "FAILED": 0})  # fmt: skip
            for what, path in outputs.items():
                for overwrite in (False, True):
                    verdict, detail = probe(root, name, command, path, overwrite)
                    counts["probes"] += 1
                    counts[verdict] += 1
                    if verdict == "FAILED":
                        failures.append(f"kdpipe {command} {path}{' --overwrite' * overwrite} "
                                        f"({what}): {detail.strip()[-300:]}")  # fmt: skip
                    if tree_digest(root) != tree_digest(pristine):
                        with working_directory(work):
                            shutil.rmtree(root)
                            shutil.copytree(pristine, root, symlinks=True)
    return {"outputs": list(outputs), "by_command": rows, "failures": failures}


def bmp(rng: random.Random) -> bytes:
    """A small BMP of random size and colour: any file kdpipe can index."""
    import io

    side = rng.randint(4, 24)
    colour = tuple(rng.randrange(256) for _ in range(3))
    buffer = io.BytesIO()
    Image.new("RGB", (side, rng.randint(4, 24)), colour).save(buffer, "BMP")
    return buffer.getvalue()


def forged_pair(rng: random.Random) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Two unlabeled folders of the same files whose old rows join to the same bytes: in
    the first, file i's name swallows file i+1's row at one or more chosen boundaries;
    in the second, at others. Names are in sorted order (the index's order) both times."""
    count = rng.randint(3, 6)
    stems = sorted(f"{rng.choice('abcdefgh')}{i:02d}" for i in range(count))
    files = [(f"{stem}.bmp", bmp(rng)) for stem in stems]

    def folder(joins: set[int]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        name, data = files[0]
        for i in range(1, count):
            if i in joins:  # row i folds into the name before it
                sha = hashlib.sha256(data).hexdigest()
                name = f"{name}\t-1\t{sha}\n{files[i][0]}"
                data = files[i][1]
            else:
                out[name] = data
                name, data = files[i]
        out[name] = data
        return out

    boundaries = list(range(1, count))

    def joins() -> set[int]:  # at most two in a row: three rows in one name pass 255 bytes
        chosen: set[int] = set()
        for b in boundaries:
            if rng.random() < 0.5 and not {b - 1, b - 2} <= chosen:
                chosen.add(b)
        return chosen

    first, second = joins(), joins()
    while first == second:
        second = joins()
    return folder(first), folder(second)


def old_rows(root: Path) -> str:
    index = load_dataset(str(root), "train").index
    return "".join(f"{e.path}\t{e.label}\t{e.sha256}\n" for e in index.entries)


def framing_campaign(work: Path, rng: random.Random, trials: int) -> dict:
    """``trials`` forged pairs: how many the old framing confused, how many kdpipe tells apart."""
    counts = {"pairs": 0, "old_framing_equal": 0, "fingerprints_differ": 0}
    failures: list[str] = []
    for trial in range(trials):
        pair = forged_pair(rng)
        roots = []
        for side, files in zip("ab", pair, strict=True):
            root = work / "framing" / f"{trial}{side}"
            (root / "train").mkdir(parents=True)
            for name, data in files.items():
                (root / "train" / name).write_bytes(data)
            roots.append(root)
        counts["pairs"] += 1
        counts["old_framing_equal"] += old_rows(roots[0]) == old_rows(roots[1])
        prints = [load_dataset(str(r), "train").fingerprint()["sha256"] for r in roots]
        differ = prints[0] != prints[1]
        counts["fingerprints_differ"] += differ
        if not differ:
            failures.append(f"pair {trial}: {sorted(pair[0])} and {sorted(pair[1])}")
    return {**counts, "failures": failures}


def section(guard: dict, framing: dict) -> str:
    """The Markdown of both sweeps, for docs/reliability.md."""
    keys = ("probes", "refused", "replaced", "FAILED")
    totals = [sum(c[k] for c in guard["by_command"].values()) for k in keys]
    lines = [
        f"**Output guard.** {len(guard['by_command'])} commands and output options x "
        f"{len(guard['outputs'])} "
        "dangerous outputs x with and without `--overwrite`, each run from `project/work` "
        "in a sandbox (data, teacher, cache, student, ONNX file, evaluate's JSON, a folder "
        "and a file of the user's). Outputs: " + "; ".join(guard["outputs"]) + ". A probe "
        "is *refused* when it ends in one `Error:` line and the sandbox's tree (every path, "
        "every file's bytes) is unchanged; *replaced* when, with `--overwrite`, it replaced "
        "an output of its own kind that kdpipe wrote and that is not its input (exit 0, "
        "nothing else changed; the sandbox is then restored); anything else *failed*.",
        "",
        "| command | probes | refused | replaced | failed |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | " + " | ".join(str(c[k]) for k in keys) + " |"
            for name, c in guard["by_command"].items()
        ),
        "| **all** | " + " | ".join(f"**{t}**" for t in totals) + " |",
        "",
        "Failed: " + ("; ".join(guard["failures"]) if guard["failures"] else "none."),
        "",
        f"**Fingerprint framing.** {framing['pairs']} random pairs of unlabeled folders (3 to 6 "
        "BMPs of random sizes; names that hold a tab, a digest and a newline fold the next "
        "row into theirs at random boundaries). The old framing (`PATH\\tLABEL\\tSHA\\n` "
        f"joined) gave the same bytes for {framing['old_framing_equal']} of them; kdpipe's "
        f"fingerprints differ for **{framing['fingerprints_differ']}**.",
        "",
        "Failed: " + ("; ".join(framing["failures"]) if framing["failures"] else "none."),
    ]
    return "\n".join(lines)

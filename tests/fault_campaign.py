"""Fault campaign on a real cache: random SIGKILLs of cache-teacher, random single-bit flips.

Run by ``make faults`` (not by pytest: it takes minutes). Kills: cache-teacher
is started again and again and killed after a random delay; every resumed
store must end byte-identical to an uninterrupted one, and no chunk flagged
as finished may be written again. Flips: one random bit of one random byte of
the finished store (every byte of every file equally likely) is inverted;
``verify`` and the training reader must both refuse the store; the byte is
then restored. Then the output guard and the fingerprint framing are swept
(:mod:`guard_campaign`). The figures go into a section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from guard_campaign import framing_campaign, guard_campaign
from guard_campaign import section as guard_section
from kdpipe.base.errors import KdpipeError
from kdpipe.tools.publish import machine_line, replace_section


def cache_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdpipe",
        "cache-teacher",
        "--teacher",
        args.teacher,
        "--data",
        args.data,
        "--data-root",
        args.data_root,
        "--temperature",
        "4",
        "--chunk-size",
        str(args.chunk_size),
        "--out",
        str(out),
    ]


def data_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".partial")
    }


def flagged_identities(store: Path) -> dict[str, tuple[int, int]]:
    """inode and mtime of every data chunk whose progress flag exists (a rewrite changes both)."""
    identities = {}
    progress = store / "progress" / "c"
    for flag in progress.iterdir() if progress.is_dir() else ():
        for chunk in (
            store / "logprobs" / "c" / flag.name / "0" / "0",
            store / "labels" / "c" / flag.name,
        ):
            if chunk.is_file():
                stat = chunk.stat()
                identities[str(chunk.relative_to(store))] = (stat.st_ino, stat.st_mtime_ns)
    return identities


def kill_campaign(args: argparse.Namespace, work: Path, rng: random.Random) -> dict:
    reference = work / "reference.zarr"
    started = time.perf_counter()
    subprocess.run(cache_command(args, reference), check=True, capture_output=True)
    full = time.perf_counter() - started
    expected = data_files(reference)
    out = work / "killed.zarr"
    kills = recovered = restarts = recomputed = 0
    kept: dict[str, tuple[int, int]] = {}
    while kills < args.kills:
        process = subprocess.Popen(
            cache_command(args, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            process.wait(timeout=rng.uniform(0.2, full))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            print(f"kill {kills}: {len(flagged_identities(out)) // 2} chunk(s) flagged", flush=True)
            now = flagged_identities(out)
            recomputed += sum(1 for key, ident in kept.items() if now.get(key) != ident)
            kept = now
            continue
        # it finished before the kill: check it, then start over so that kills keep coming
        assert process.returncode == 0, "cache-teacher failed"
        recovered += data_files(out) == expected
        restarts += 1
        shutil.rmtree(out)
        kept = {}
    final = subprocess.run(cache_command(args, out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    now = flagged_identities(out)
    recomputed += sum(1 for key, ident in kept.items() if now.get(key) != ident)
    identical = data_files(out) == expected
    return {
        "kills": kills,
        "identical": identical,
        "runs_finished_between_kills": restarts,
        "of_which_identical": recovered,
        "chunks_recomputed": recomputed,
        "uninterrupted_seconds": round(full, 1),
        "complete": json.loads((out / "zarr.json").read_text())["attributes"]["kdpipe"]["status"],
    }


def flip_campaign(args: argparse.Namespace, store: Path, rng: random.Random) -> dict:
    files = [p for p in sorted(store.rglob("*")) if p.is_file()]
    sizes = [p.stat().st_size for p in files]
    by_kind: dict[str, list[int]] = {}
    missed = []
    for number in range(args.flips):
        (path,) = rng.choices(files, weights=sizes)
        original = path.read_bytes()
        offset, bit = rng.randrange(len(original)), rng.randrange(8)
        damaged = bytearray(original)
        damaged[offset] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        try:
            by_verify, by_reader = detected(store)
        finally:
            path.write_bytes(original)
        kind = (
            "zarr.json" if path.name == "zarr.json" else str(path.relative_to(store)).split("/")[0]
        )
        if not tally(by_kind, kind, by_verify, by_reader):
            missed.append(f"flip {number}: {path.relative_to(store)} byte {offset} bit {bit}")
    assert detected(store) == (False, False), "the store was not restored after the flips"
    return {"by_kind": by_kind, "missed": missed}


def tally(counts: dict[str, list[int]], kind: str, by_verify: bool, by_reader: bool) -> bool:
    """Count one trial of ``kind`` (trials, caught by verify, caught by the reader); True
    when both caught it."""
    row = counts.setdefault(kind, [0, 0, 0])
    row[0] += 1
    row[1] += by_verify
    row[2] += by_reader
    return by_verify and by_reader


def detected(store: Path) -> tuple[bool, bool]:
    """Whether ``kdpipe verify`` and the training reader each refuse the store."""
    from kdpipe.cache import load_soft_labels
    from kdpipe.check.verify import verify_cache

    by_verify = not verify_cache(store).ok
    try:
        load_soft_labels(store)
        by_reader = False
    except KdpipeError:
        by_reader = True
    return by_verify, by_reader


def chunk_file(store: Path, name: str, index: int) -> Path:
    (path,) = [p for p in (store / name / "c" / str(index)).rglob("*") if p.is_file()] or [
        store / name / "c" / str(index)
    ]
    return path


def move_campaign(args: argparse.Namespace, store: Path, rng: random.Random) -> dict:
    """Chunks that are intact but misplaced: two chunks of one array swapped, and a chunk
    of another cache of the same shape (made at another temperature) copied in, alone or
    with its position digest. Each is undone after the check."""
    foreign = args.work / "foreign.zarr"
    command = cache_command(args, foreign)
    command[command.index("--temperature") + 1] = "5"
    subprocess.run(command, check=True, capture_output=True)
    names = ["logprobs", "labels", "indices", "views", "partners"]
    num_chunks = len(list((store / "progress" / "c").iterdir()))
    trials: dict[str, list[int]] = {}
    missed, skipped = [], 0
    for number in range(args.moves):
        kind = ("swap", "foreign", "foreign + digest")[number % 3]
        name = rng.choice(names)
        first, second = rng.sample(range(num_chunks), 2)
        targets = [chunk_file(store, name, first)]
        if kind == "swap":
            targets.append(chunk_file(store, name, second))
            replacements = [targets[1].read_bytes(), targets[0].read_bytes()]
        else:
            replacements = [chunk_file(foreign, name, first).read_bytes()]
            if kind == "foreign + digest":
                targets.append(chunk_file(store, "chunk_digests", first))
                replacements.append(chunk_file(foreign, "chunk_digests", first).read_bytes())
        originals = [path.read_bytes() for path in targets]
        if all(a == b for a, b in zip(originals, replacements, strict=True)):
            skipped += 1  # identical bytes (plain views, the same rows' labels): nothing moved
            continue
        for path, content in zip(targets, replacements, strict=True):
            path.write_bytes(content)
        try:
            by_verify, by_reader = detected(store)
        finally:
            for path, content in zip(targets, originals, strict=True):
                path.write_bytes(content)
        if not tally(trials, kind, by_verify, by_reader):
            missed.append(f"{kind} {number}: {name} chunk {first}/{second}")
    assert detected(store) == (False, False), "the store was not restored after the moves"
    return {"by_kind": trials, "missed": missed, "skipped": skipped}


def section(args: argparse.Namespace, kills: dict, flips: dict, moves: dict, seconds: float) -> str:
    rows = "\n".join(
        f"| {kind} | {n} | {v} | {r} |" for kind, (n, v, r) in sorted(flips["by_kind"].items())
    )
    total = [sum(c[i] for c in flips["by_kind"].values()) for i in range(3)]
    return "\n".join(
        [
            f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine_line()}; {seconds / 60:.1f} "
            "minutes in all.",
            "",
            "```",
            f"make faults   # python tests/fault_campaign.py {' '.join(sys.argv[1:])}",
            "```",
            "",
            f"**Kills.** The cache ({args.data}, chunk size {args.chunk_size}, teacher "
            f"`{args.teacher}`) took {kills['uninterrupted_seconds']} s uninterrupted, start-up "
            f"included. cache-teacher was SIGKILLed {kills['kills']} times after random delays; "
            f"{kills['runs_finished_between_kills']} runs finished before their kill (each "
            f"checked, {kills['of_which_identical']} byte-identical, then started over). Final "
            "store: status "
            f"`{kills['complete']}`, data files byte-identical to the uninterrupted run: "
            f"**{kills['identical']}**; chunks flagged done that were written again: "
            f"**{kills['chunks_recomputed']}**.",
            "",
            f"**Bit flips.** {args.flips} single-bit flips, every byte of every file of the store "
            "equally likely; detected by `kdpipe verify` and by the training reader:",
            "",
            "| file | flips | verify | reader |",
            "|---|---|---|---|",
            rows,
            f"| **all** | **{total[0]}** | **{total[1]}** | **{total[2]}** |",
            "",
            "Missed: " + ("; ".join(flips["missed"]) if flips["missed"] else "none."),
            "",
            f"**Moved and foreign chunks.** {sum(c[0] for c in moves['by_kind'].values())} "
            "intact chunks in the wrong place (each file's crc32c still right): two chunks of "
            "one array swapped; a chunk of a cache of the same shape (the same teacher at "
            f"T = 5) copied in; the same with its position digest copied too. {moves['skipped']} "
            f"of the {args.moves} draws were skipped because the bytes moved in equalled "
            "those they replaced (the `views` and `partners` of plain views, and the labels "
            "and indices of the same rows, are the same in both caches), so nothing was "
            "misplaced:",
            "",
            "| damage | trials | verify | reader |",
            "|---|---|---|---|",
            *(f"| {kind} | {n} | {v} | {r} |" for kind, (n, v, r) in moves["by_kind"].items()),
            "",
            "Missed: " + ("; ".join(moves["missed"]) if moves["missed"] else "none."),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--work", type=Path, default=Path("runs/faults"))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--moves", type=int, default=60)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forgeries", type=int, default=100)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--guard-only",
        action="store_true",
        help="only the output guard and the framing sweeps (no --markdown)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.perf_counter()
    guard = guard_campaign(args.work.resolve(), Path(args.data_root).resolve())
    print(json.dumps(guard, indent=2), flush=True)
    framing = framing_campaign(args.work.resolve(), rng, args.forgeries)
    print(json.dumps(framing, indent=2), flush=True)
    swept = not guard["failures"] and not framing["failures"]
    if args.guard_only:
        sys.exit(0 if swept else 1)
    kills = kill_campaign(args, args.work, rng)
    print(json.dumps(kills, indent=2), flush=True)
    flips = flip_campaign(args, args.work / "reference.zarr", rng)
    print(json.dumps(flips, indent=2), flush=True)
    moves = move_campaign(args, args.work / "reference.zarr", rng)
    print(json.dumps(moves, indent=2), flush=True)
    if args.markdown:
        text = section(args, kills, flips, moves, time.perf_counter() - started)
        text += "\n\n" + guard_section(guard, framing)
        replace_section(args.markdown, "faults", text)
    ok = (
        kills["identical"]
        and not kills["chunks_recomputed"]
        and not flips["missed"]
        and not moves["missed"]
        and swept
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

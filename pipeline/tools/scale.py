"""An ImageNet-shaped cache on one machine (issue 26): what the store costs at 1.28M rows.

The teacher pass is not what is measured: a fast stand-in teacher (timm's registered
``kd_mlp_30x2`` with random weights, imported like any timm teacher) runs over tiny
synthetic images (1 x 4 x 4, random, as many rows as ImageNet-1k's training split) through
kdpipe's own ``cache-teacher`` path and writer, with the views and top-K people use. What
is measured is the store: bytes on disk, files, write rate, ``verify`` time, and the
rows per second a student's access pattern (``--cache-memory``: shuffled windows of
whole chunks) reads from local disk and from an S3 server (moto's, started here in its
own process, counting the requests it serves and the bytes it sends).

Run by ``make scale`` (not by the tests: it takes minutes); the figures go into
docs/scale.md between the markers of its ``scale`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdpipe.cache import Manifest
    from kdpipe.data.datasets import ImageSet

# ImageNet-1k's training split, and timm issue 1491's ResNet-50 training rate on one A100
# (AMP, channels-last, timm's benchmark.py): the student that reads the cache
IMAGENET_ROWS = 1_281_167
RESNET50_ROWS_PER_S = 2600
LOGIT_STD = 8.0  # the stand-in teacher's logit spread (what its rows hold: docs/scale.md)


@dataclass(frozen=True)
class ScaleConfig:
    """One shape of cache and how it is read."""

    work: Path
    rows: int = IMAGENET_ROWS
    classes: int = 1000
    views: int = 8
    top_k: int | None = 10
    chunk_size: int = 4096
    side: int = 4
    batch_size: int = 256
    memory: int = 2 << 30  # --cache-memory of the reads: bytes of decoded rows
    read_rows: int | None = None  # rows read per arm (None: one epoch)
    object_store: bool = True
    nodes: bool = False  # also write it over two simulated nodes, one killed, resumed
    seed: int = 0


def stand_in_data(config: ScaleConfig) -> ImageSet:
    """``rows`` random 1 x side x side images with random labels of ``classes`` classes."""
    from kdpipe.data.datasets import ImageSet

    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randint(0, 256, (config.rows, 1, config.side, config.side),
                           dtype=torch.uint8, generator=generator)  # fmt: skip
    labels = torch.randint(0, config.classes, (config.rows,), generator=generator)
    classes = tuple(f"c{index:04d}" for index in range(config.classes))
    return ImageSet(name="scale-synthetic", split="train", images=images, labels=labels,
                    classes=classes)  # fmt: skip


def stand_in_teacher(config: ScaleConfig, out: Path) -> Path:
    """timm's ``kd_mlp_30x2`` at the data's size, random weights saved and imported as a
    teacher run (the path a user's own weights file takes). Its head is scaled so that
    the logits' standard deviation over the data is ``LOGIT_STD``: a random network's
    near-equal logits would store near-uniform rows, which compress far better than a
    trained teacher's, and the bytes on disk would flatter the store."""
    import safetensors.torch
    import timm
    from kdpipe.models.registry import check_architecture
    from kdpipe.models.runs import import_teacher

    check_architecture("kd_mlp_30x2")  # kdpipe's networks, registered in timm's registry

    torch.manual_seed(config.seed)
    model = timm.create_model("kd_mlp_30x2", num_classes=config.classes, in_chans=1,
                              img_size=[config.side, config.side]).eval()  # fmt: skip
    sample = torch.randint(0, 256, (4096, 1, config.side, config.side),
                           generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
    with torch.no_grad():
        spread = float(model((sample.float() / 255 - 0.5) / 0.25).std())
        model.head.weight *= LOGIT_STD / spread
        model.head.bias *= LOGIT_STD / spread
    weights = out.parent / "stand-in-teacher.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    import_teacher("timm:kd_mlp_30x2", out, weights=weights,
                   data_config={"img_size": config.side, "mean": (0.5,), "std": (0.25,)},
                   log=lambda _line: None)  # fmt: skip
    return out


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    total, count = 0, 0
    for folder, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(folder, name))
            count += 1
    return total, count


def read_rate(location: str, dataset: ImageSet, config: ScaleConfig) -> dict:
    """Rows per second of a student's epoch order over the cache at ``location``, streamed
    with ``config.memory`` of decoded rows: batches gathered as train-student gathers
    them (soft labels of the epoch's view, and its images), nothing trained."""
    from kdpipe.base.distributed import SINGLE
    from kdpipe.cache import StreamedSoftLabels
    from kdpipe.train.batches import EpochBatches, TrainData

    started = time.perf_counter()
    streamed = StreamedSoftLabels(location, config.memory)
    data = TrainData.cached(dataset, streamed, streamed.log_probs())
    order = data.epoch_order(torch.Generator().manual_seed(0), seed=0, epoch=1)
    if config.read_rows is not None:
        order = order[: config.read_rows]
    opened = time.perf_counter() - started
    batches = EpochBatches(data, order, config.batch_size, 1, 0, SINGLE)
    started = time.perf_counter()
    rows = 0
    for batch in batches.load(workers=0, pin_memory=False):
        rows += len(batch["labels"])
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "open_seconds": round(opened, 2)}  # fmt: skip


# --- an S3 server in its own process, counting what it serves ----------------------------------


def serve(port: int) -> None:
    """moto's S3 server on ``port`` behind a WSGI wrapper that counts requests by method
    and the bytes of their responses; ``GET /_kdpipe_counts`` answers the counts."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    counts: dict[str, int] = {}

    def counting(environ: dict, start_response: Callable) -> object:
        if environ.get("PATH_INFO") == "/_kdpipe_counts":
            body = json.dumps(counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        method = environ["REQUEST_METHOD"]
        counts[method] = counts.get(method, 0) + 1

        def counted(status: str, headers: list, *rest: object) -> object:
            size = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            counts[f"{method}_bytes"] = counts.get(f"{method}_bytes", 0) + size
            return start_response(status, headers, *rest)

        return app(environ, counted)

    make_server("127.0.0.1", port, counting, True,
                request_handler=MotoRequestHandler).serve_forever()  # fmt: skip


class CountingS3:
    """The counting server as a subprocess, fsspec pointed at it while in use."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CountingS3:
        import fsspec

        self.process = subprocess.Popen(
            [sys.executable, "-m", "kdpipe.tools.scale", "--serve", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            try:
                self.counts()
                break
            except OSError:
                time.sleep(0.05)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        fsspec.config.conf["s3"] = {"endpoint_url": self.url}
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True)
        return self

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_kdpipe_counts", timeout=5) as answer:
            return json.loads(answer.read())

    def __exit__(self, *_: object) -> None:
        import fsspec

        fsspec.config.conf.pop("s3", None)
        self.process.terminate()
        self.process.wait(timeout=30)


def write_cache(
    config: ScaleConfig,
    dataset: ImageSet,
    teacher: Path,
    cache: Path,
    *,
    overwrite: bool,
    log: Callable[[str], None] = print,
) -> Manifest:
    """The stand-in teacher's pass through ``cache_teacher``: in this process, or in each
    process of a torchrun job (``--write-only``), resuming what is already flagged done."""
    from kdpipe.models.teach import CacheConfig, cache_teacher
    from kdpipe.views.policy import ViewPolicy

    policy = ViewPolicy(augment="shift-flip") if config.views > 1 else ViewPolicy()
    return cache_teacher(
        CacheConfig(teachers=(str(teacher),), out=str(cache), temperature=4.0,
                    views=config.views, policy=policy, top_k=config.top_k,
                    chunk_size=config.chunk_size, batch_size=8192, device="cpu",
                    overwrite=overwrite),
        dataset, log=log,
    )  # fmt: skip


def data_digests(store: Path) -> dict[str, str]:
    """SHA-256 of every file of a store but the metadata (``zarr.json`` records times)."""
    import hashlib

    return {
        str(path.relative_to(store)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(store.rglob("*"))
        if path.is_file() and path.name != "zarr.json"
    }


def free_port() -> int:
    """A TCP port free on loopback now (for a server or a rendezvous started next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_commands(target: list[str]) -> list[list[str]]:
    """The command lines of two simulated nodes running ``target`` (``-m MODULE ARGS``):
    two ``torchrun --nnodes 2 --nproc_per_node 1`` launches, node ranks 0 and 1, meeting at
    a fresh localhost port."""
    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
             *target] for rank in (0, 1)]  # fmt: skip


def kill_node(pid: int) -> None:
    """SIGKILL a launched node: every process under it first (torchrun starts its workers
    in sessions of their own, so killing the agent's process group leaves them running,
    still writing: the first large two-node run met that), then the agent ``pid``."""
    import contextlib
    import signal

    for process in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(process, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: each process's parent), deepest last."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def two_nodes(config: ScaleConfig, teacher: Path, reference: Path,
              log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """The same store over two simulated nodes (two ``torchrun --nnodes 2`` launches on
    localhost, one process each), node 1 SIGKILLed (its agent and every process under it:
    a node lost) once a third of the chunks are flagged done, node 0 stopped too if it
    waits (torchrun's agent does, at its exit barrier), then both launched again to
    resume; the result against ``reference``, the one-process store, file by file."""

    out = config.work / "two-nodes.zarr"
    args = ["--work", str(config.work), "--rows", str(config.rows), "--classes",
            str(config.classes), "--views", str(config.views), "--top-k",
            str(config.top_k or 0), "--chunk-size", str(config.chunk_size),
            "--write-only", str(out), "--teacher", str(teacher)]  # fmt: skip

    def launch() -> list[subprocess.Popen]:
        return [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
                for command in node_commands(["-m", "kdpipe.tools.scale", *args])]  # fmt: skip

    chunks = -(-config.rows // config.chunk_size)
    target = max(1, chunks // 3)  # a third of the chunks durable: the pass's middle
    flags = out / "progress" / "c"
    started = time.perf_counter()
    nodes = launch()
    while nodes[1].poll() is None and nodes[0].poll() is None:
        if flags.is_dir() and len(list(flags.iterdir())) >= target:
            kill_node(nodes[1].pid)  # the node lost: its agent and its worker
            break
        time.sleep(0.2)  # polling the store's flags, not a timing the result depends on
    flagged = len(list(flags.iterdir())) if flags.is_dir() else 0
    codes = [None, nodes[1].wait()]
    try:  # the survivor sees its peer gone; torchrun's agent may wait at its exit barrier
        codes[0] = nodes[0].wait(timeout=60)
        stopped_itself = True
    except subprocess.TimeoutExpired:
        kill_node(nodes[0].pid)  # what a scheduler does with a broken job
        codes[0], stopped_itself = nodes[0].wait(), False
    killed = time.perf_counter() - started
    started = time.perf_counter()
    resumed = [node.wait() for node in launch()]
    resume_seconds = time.perf_counter() - started
    ours, theirs = data_digests(out), data_digests(reference)
    result = {
        "chunks": chunks, "exit_codes_killed": codes, "node0_stopped_itself": stopped_itself,
        "chunks_flagged_at_kill": flagged, "killed_pass_seconds": round(killed, 1),
        "exit_codes_resumed": resumed, "resume_seconds": round(resume_seconds, 1),
        "files": len(ours), "identical": ours == theirs,
        "differing": sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))[:5],
    }  # fmt: skip
    log(f"two nodes: {result}")
    return result


def measure(config: ScaleConfig, log: Callable[[str], None] = print) -> dict:
    """Write the cache, then measure it: the figures of docs/scale.md's section."""
    import zarr
    from kdpipe.check.verify import verify_cache

    work = config.work
    work.mkdir(parents=True, exist_ok=True)
    dataset = stand_in_data(config)
    teacher = stand_in_teacher(config, work / "teacher")
    cache = work / "cache.zarr"
    started = time.perf_counter()
    manifest = write_cache(config, dataset, teacher, cache, overwrite=True, log=log)
    write_seconds = time.perf_counter() - started
    size, files = tree_size(cache)
    group = zarr.open_group(str(cache), mode="r")
    raw = sum(int(group[name].nbytes) for name in group.array_keys())
    log(f"written: {size / 2**20:.1f} MiB in {files} files, {write_seconds:.1f} s")
    started = time.perf_counter()
    report = verify_cache(cache)
    verify_seconds = time.perf_counter() - started
    log(f"verify: {'ok' if report.ok else 'FAILED'} in {verify_seconds:.1f} s")
    local = read_rate(str(cache), dataset, config)
    log(f"read from local disk: {local}")
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "chunks": -(-manifest.num_samples // manifest.chunk_size),
        "bytes": size, "raw_bytes": raw, "files": files, "write_seconds": round(write_seconds, 1),
        "write_rows_per_s": round(config.rows / write_seconds),
        "verify_ok": report.ok, "verify_seconds": round(verify_seconds, 1),
        "local": local,
    }  # fmt: skip
    if config.nodes:
        result["two_nodes"] = two_nodes(config, teacher, cache, log)
    if config.object_store:
        with CountingS3() as s3:
            s3.fs.mkdir("kdpipe-scale")
            started = time.perf_counter()
            s3.fs.put(str(cache), "kdpipe-scale/cache.zarr", recursive=True)
            result["upload_seconds"] = round(time.perf_counter() - started, 1)
            before = s3.counts()
            remote = read_rate("s3://kdpipe-scale/cache.zarr", dataset, config)
            after = s3.counts()
            gets = after.get("GET", 0) - before.get("GET", 0)
            sent = after.get("GET_bytes", 0) - before.get("GET_bytes", 0)
            remote |= {"gets": gets, "get_bytes": sent,
                       "gets_per_s": round(gets / remote["seconds"], 1),
                       "bytes_per_get": round(sent / gets) if gets else 0}  # fmt: skip
            result["object_store"] = remote
            log(f"read from the S3 server: {remote}")
    return result


def section(result: dict, command: str, seconds: float) -> str:
    """The Markdown of one measured shape, for docs/scale.md (between its markers)."""
    from datetime import UTC, datetime

    from kdpipe.tools.publish import machine_line

    config = result["config"]
    storage = f"top-{config['top_k']}" if config["top_k"] else "dense"
    local, remote = result["local"], result.get("object_store")
    per_row = result["bytes"] / config["rows"]
    lines = [
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine_line()}; "
        f"{seconds / 60:.1f} minutes in all.",
        "",
        "```",
        command,
        "```",
        "",
        f"Shape: {config['rows']:,} rows x {config['views']} views, {storage} of "
        f"{config['classes']} classes, float16, chunks of {config['chunk_size']} rows; "
        f"reads: batches of {config['batch_size']} in a student's epoch order, "
        f"--cache-memory {config['memory'] / 2**30:g} GiB.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| bytes on disk | {result['bytes'] / 2**20:,.1f} MiB ({per_row:.1f} B a row, "
        f"{per_row / config['views']:.1f} B a view); uncompressed "
        f"{result['raw_bytes'] / 2**20:,.1f} MiB |",
        f"| files | {result['files']:,} ({result['chunks']:,} chunks) |",
        f"| write (stand-in teacher pass included) | {result['write_seconds']:,.1f} s, "
        f"{result['write_rows_per_s']:,} rows/s |",
        f"| `verify` | {result['verify_seconds']:,.1f} s, "
        f"{'ok' if result['verify_ok'] else 'FAILED'} |",
        f"| read, local disk | {local['rows_per_s']:,} rows/s ({local['rows']:,} rows in "
        f"{local['seconds']} s; opened in {local['open_seconds']} s) = "
        f"{local['rows_per_s'] / RESNET50_ROWS_PER_S:.1f} x a ResNet-50 student's "
        f"{RESNET50_ROWS_PER_S:,} rows/s |",
    ]
    if remote is not None:
        lines += [
            f"| read, S3 server (moto, loopback) | {remote['rows_per_s']:,} rows/s "
            f"({remote['rows']:,} rows in {remote['seconds']} s; opened in "
            f"{remote['open_seconds']} s) = {remote['rows_per_s'] / RESNET50_ROWS_PER_S:.1f} "
            "x the student |",
            f"| requests of that read | {remote['gets']:,} GETs, {remote['gets_per_s']:,} a "
            f"second, {remote['bytes_per_get'] / 2**10:,.1f} KiB a GET |",
            f"| upload of the store (fsspec put) | {result['upload_seconds']} s |",
        ]
    nodes = result.get("two_nodes")
    if nodes is not None:
        lines.append(
            f"| two simulated nodes, node 1 killed (agent and worker) once "
            f"{nodes['chunks_flagged_at_kill']} of {nodes['chunks']} chunks were flagged; node 0 "
            + (
                "stopped by itself"
                if nodes["node0_stopped_itself"]
                else "still running a minute later (its own share, then torchrun's exit barrier), "
                "so stopped too"
            )
            + "; both launched again | resumed "
            f"in {nodes['resume_seconds']} s (exit {nodes['exit_codes_resumed']}); "
            f"{nodes['files']:,} files byte-identical to the one-process store: "
            f"**{nodes['identical']}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--rows", type=int, default=IMAGENET_ROWS)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10, help="0: dense")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--read-rows", type=int, default=None)
    parser.add_argument("--no-object-store", action="store_true")
    parser.add_argument(
        "--two-nodes",
        action="store_true",
        help="also write the store over two simulated nodes, kill and resume",
    )
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--section", default="scale")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    config = ScaleConfig(work=args.work, rows=args.rows, classes=args.classes, views=args.views,
                         top_k=args.top_k or None, chunk_size=args.chunk_size,
                         memory=args.memory_mib << 20, read_rows=args.read_rows,
                         object_store=not args.no_object_store,
                         nodes=args.two_nodes)  # fmt: skip
    if args.write_only:  # one process of two_nodes' torchrun job
        write_cache(config, stand_in_data(config), args.teacher, args.write_only,
                    overwrite=False, log=lambda _line: None)  # fmt: skip
        return
    started = time.perf_counter()
    result = measure(config)
    text = json.dumps(result, indent=1)
    if args.markdown is not None:
        from kdpipe.tools.publish import replace_section

        command = "python -m kdpipe.tools.scale " + " ".join(sys.argv[1:])
        replace_section(args.markdown, args.section,
                        section(result, command, time.perf_counter() - started))  # fmt: skip
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

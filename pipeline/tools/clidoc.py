"""Writes docs/cli.md: a short introduction per command and its --help, verbatim.

``make cli-docs`` runs it; ``tests/test_cli.py`` fails when the file and the
program's --help disagree, so the reference cannot drift.
"""

from __future__ import annotations

import sys

from click.testing import CliRunner
from kdpipe.cli import main

HEADER = (
    "Every command below is `kdpipe COMMAND` (or `python -m kdpipe COMMAND`). Each block is "
    "the command's `--help` output, verbatim; `tests/test_cli.py` fails when a block here "
    "differs from the program's (regenerate with `make cli-docs`). Errors print one line "
    "(`Error: ...`) and exit with status 1; option values that can never work (T ≤ 0, α "
    "outside [0, 1], unknown choices) are rejected by click with status 2. Nothing already "
    "written is changed before the inputs have been checked; an existing output is replaced "
    "only with `--overwrite`."
)

INTRODUCTIONS = {
    "fetch-data": (
        "Puts Fashion-MNIST's four gzipped IDX files into `--dest` from Debian's "
        "`dataset-fashion-mnist` package (`apt-get download` + `dpkg-deb -x`, no root), or from "
        "the official URLs, and verifies the SHA-256 of each file's decompressed content. A "
        "no-op when the files are already there and verified. `make data` runs it."
    ),
    "pack-shards": (
        "Writes an image folder's splits (those of `train/` and `test/` it has) as WebDataset "
        "tar shards, kdpipe's format for data larger than a disk of loose files: "
        "`OUT/train-000000.tar`, ... of at most `--shard-size` samples "
        "(`webdataset.ShardWriter`) and `OUT/classes.txt`. Samples are in the folder's "
        "canonical order, keyed by position (zero-padded), each file's bytes copied as they "
        "are with a `cls` label, so `--data OUT` has the folder's rows, pixels and cached "
        "values; the fingerprint is the shards' own (keys, not paths). Built beside `--out` and "
        "moved into place at the end: a failure leaves nothing. `--out` must be new or empty; "
        "an unlabeled split is refused. Shards are read from a folder, any fsspec URL of one, "
        "or a `{split}` pattern (see [cache-format.md](cache-format.md))."
    ),
    "train-teacher": (
        "Trains any timm architecture on hard labels and writes a run directory: "
        "`model.safetensors`, `model.json` (architecture, data config, weights hash: the "
        "*teacher version*), `config.json`, `metrics.csv`. `--dropout` and `--jitter` are the "
        "regularisers of Hinton et al.'s MNIST teacher. Optimizers and schedules come from "
        "timm's `create_optimizer_v2` / `create_scheduler_v2` (`--opt adamw`, `--sched step`, "
        "...); the schedule and its `--warmup-epochs` move after every optimizer update "
        "(`--sched-on update`, timm's `step_update`, the default) or once per epoch "
        "(`--sched-on epoch`, how runs saved before the option was added resume). The resolved "
        "schedule is in `config.json` (`resolved.schedule`). A checkpoint is kept after every "
        "epoch until the run finishes: "
        "`--resume RUN_DIR` continues a killed run and ends with the same weights and metrics "
        "as an uninterrupted one. `--val-fraction F` holds out one fixed random share of the "
        "training split (the same rows in every run, whatever its seed or transfer set), "
        "scores it with the test split, and `--early-stopping N` stops after N evaluations "
        "without fewer validation errors, keeping the best epoch's weights (`model.json` "
        "records which epoch as `selection`). `--log tensorboard|mlflow` also sends each "
        "`metrics.csv` row to TensorBoard event files in the run directory or to a local MLflow "
        "store (`RUN_DIR/mlruns`), the configuration and lineage as parameters (the `log` "
        "extra: `pip install 'kdpipe[log]'`; see [python-api.md](python-api.md)). "
        "`--pretrained SOURCE [--weights FILE]` (SOURCE as `import-teacher` takes it) starts "
        "from pretrained weights instead, with a new head for the dataset's classes (timm's "
        "`reset_classifier`), at the weights' own preprocessing (its `pretrained_cfg`, not the "
        "dataset's statistics; a one-channel dataset gets timm's adapted first convolution and "
        "the channel mean of mean and std); `--model` may then be left out."
    ),
    "import-teacher": (
        "Brings a teacher that kdpipe did not train: writes a teacher run directory with the "
        "contract of `train-teacher`'s (`model.safetensors`, `model.json` with the weights' "
        "content hash), so that `cache-teacher`, `verify`, `evaluate` and `lineage` take it "
        "like any other. SOURCE is one of timm's names for pretrained weights: `timm:ARCH` "
        "(or `timm:ARCH.TAG`), `hf-hub:ORG/NAME` (a timm model on the Hugging Face hub), or "
        "`local-dir:PATH` (the hub's `config.json` and weights in a folder). The weights come "
        "through `timm.create_model(..., pretrained=True)`, downloaded by timm when a network "
        "exists, or from `--weights FILE`: a safetensors file, or a torch checkpoint read with "
        "`torch.load(weights_only=True)` (a `state_dict`, `model` or EMA entry is unwrapped, "
        "`module.` prefixes removed, as timm does), handed to timm's own loading. The head "
        "stays as the weights have it: `--num-classes C` or `--classes FILE` (one name per "
        "line) check it, and a head that does not fit is an error naming both numbers "
        "(`train-teacher --pretrained` gives a new head). The preprocessing is the model's own "
        "`pretrained_cfg` (input size, mean, std, interpolation, crop_pct, crop_mode; for "
        "`timm:ARCH`, that of ARCH's default pretrained tag, unless `timm:ARCH.TAG` names "
        "another: the tag is recorded), "
        "resolved by timm and recorded in `model.json` and in every cache made with the "
        "teacher: a stored image goes through timm's eval transform (Resize to "
        "floor(size / crop_pct) with that interpolation and antialiasing, CenterCrop, "
        "normalisation). A `pretrained_cfg` without its own mean, std and size is refused "
        "rather than filled with defaults. `model.json`'s `source` records the SOURCE, the "
        "pretrained tag, the weights file and its SHA-256."
    ),
    "cache-teacher": (
        "Stage one. Runs the teacher (several `--teacher` = an ensemble) once over a dataset "
        "split, in eval mode without gradients, on the GPU when there is one (`--device auto`), "
        "and writes `log_softmax(z / T)` into a Zarr v3 store (format: "
        "[cache-format.md](cache-format.md)). Each chunk is flagged done only after its data is "
        "flushed to disk, and the manifest's status becomes `complete` only after every chunk. "
        "Killed at any moment and run again with the same arguments, it resumes from the last "
        "durable chunk and ends byte-identical to an uninterrupted run; run again with other "
        "arguments against a partial store, it refuses and names what differs (unless "
        "`--overwrite`). NaN or Inf teacher outputs stop the pass with the sample indices; the "
        "store then stays `writing`. With `--views V --augment … [--mix …]` each row gets V "
        "augmented views whose parameters (crop box, flip, mix partner and weight) are stored "
        "beside the outputs; `--subset` and `--exclude-classes` choose the transfer set (the "
        "dataset index of every row is stored); `--top-k K` stores the K largest "
        "log-probabilities and their classes; `--ignore-labels` caches no labels. Under "
        "`torchrun --nproc_per_node N -m kdpipe cache-teacher …` each process writes whole "
        "chunks of its own; the store is byte-identical to a one-process run, and a partial "
        "store resumes with any number of processes. `--precision auto` runs the teacher in "
        "bf16 autocast on CUDA (recorded in the manifest as `precision`; it is part of the "
        "`cache_id`) and in float32 on the CPU. `--features NAME[,NAME…]` also stores the "
        "teacher's outputs at named layers (timm's `feature_info` module names, their indices, "
        "or `pre_logits`), and `--attention NAME` their attention maps (Zagoruyko & Komodakis "
        "2017), captured in the same forward as each view's logits, float16, per row and view, "
        "chunked and position-digested like the other arrays; `--feature-grid G` average-pools "
        "spatial maps to G×G. A student run directory works as a teacher (`--teacher "
        "STUDENT_RUN`, a teacher assistant or a born-again generation): the manifest then "
        "records the chain it learned from, back to the first teacher. A `--teacher` may also "
        "be a pretrained SOURCE (`timm:ARCH`, `hf-hub:ORG/NAME`, `local-dir:PATH`, as "
        "`import-teacher` takes), imported on the fly through timm: the member's record names "
        "the SOURCE as its `run_dir` and carries its `source`; an ensemble may mix sources, "
        "each member at its own input size and preprocessing."
    ),
    "train-student": (
        "Stage two. Trains a student from a cache with "
        "`α·CE + (1−α)·T²·KL(p_teacher ‖ p_student)`, never loading the teacher. The dataset "
        "must match the cache's fingerprint. `--alpha 1` is the hard-label baseline through "
        "the same loop. `--temperature` re-tempers the stored values exactly (default: the "
        "cache's T). The run directory's `model.json` records the `cache_id` and `teacher_id` "
        "(lineage). `--resume RUN_DIR` continues a killed run from its last epoch checkpoint. "
        "From a cache with views, each row uses one of its V views per epoch (all V over any V "
        "consecutive epochs), rendered from the stored parameters at the student's input size: "
        "the image the teacher labelled. A cache without labels forces `--alpha 0`. A cache "
        "larger than `--cache-memory` (decoded) is streamed: whole chunks, in a shuffled order, "
        "rows shuffled within windows of chunks, the next window read ahead in a thread, at most "
        "three windows in memory (per process "
        "and DataLoader worker). Under `torchrun --nproc_per_node N -m kdpipe "
        "train-student …` the model is wrapped in DistributedDataParallel and each process "
        "takes every N-th row of each batch of `--batch-size` rows (the global batch), its loss "
        "weighted by its share: the same order, views and gradients as one process, apart "
        "from BatchNorm statistics and dropout masks. Rank 0 evaluates and writes the run "
        "directory. `--workers N` builds batches ahead in N DataLoader processes (pinned for "
        "non-blocking copies on CUDA); `--precision auto` is bf16 autocast on CUDA. "
        "`--log tensorboard|mlflow` watches the run as `train-teacher`'s does, with the "
        "`cache_id` and `teacher_id` among its parameters. `--feature-loss hint|cosine|"
        "attention --feature-weight β --student-layer NAME --teacher-layer NAME` adds β times a "
        "feature loss (FitNets' hint, cosine, attention transfer) between a student layer, "
        "mapped to the teacher's by a learned 1×1 convolution or linear projector (trained with "
        "the student, kept in its checkpoints, not in the saved model), and the teacher's layer "
        "as the cache holds it for the same view. The same training from your own "
        "loop: `pipeline.DistillationDataset` and `kdpipe.distillation_loss` "
        "([python-api.md](python-api.md))."
    ),
    "storage": (
        "Measures what a dense cache costs as float32, float16 and top-K (for each `--top-k` "
        "value): raw bytes per sample-view and the bytes actually stored, each layout written "
        "with the cache's codecs and chunking; and what top-K loses, the mean KL divergence "
        "from the cache's distribution to its reconstruction (leftover mass spread uniformly), "
        "and the share of views whose top-1 class is kept. Measure from a `--dtype float32` "
        "cache to see float16's loss too."
    ),
    "distill-online": (
        "The reference that a cache is measured against: online distillation through timm's "
        "own `timm.task.LogitDistillationTask`, the teacher run on every batch, with fresh "
        "`--augment`/`--mix` views each step. `--alpha` is timm's `task_loss_weight` (the "
        "distillation term gets 1 − α). Same run directory, metrics and `--resume` as the "
        "other training commands."
    ),
    "bench": (
        "Times the pipeline in one process, so that its ratios compare runs under the same "
        "load: P1 the teacher pass (writing the store) against a bare inference loop of the "
        "same teacher; P2 a cached student epoch against the same student's hard-label epoch; "
        "P3 an online distillation epoch (timm's `LogitDistillationTask`) against the cached "
        "one, beside the ideal ratio (teacher forward + student step) / student step; P4 how "
        "fast batches of soft labels are read, from memory and streamed, as a multiple of the "
        "student's training rate; P5 bytes per sample-view of each storage layout and the "
        "cost of S students offline against online. `make bench` writes "
        "[benchmarks.md](benchmarks.md)."
    ),
    "detect-folder": (
        "Builds a detection set in Ultralytics' YOLO format from Fashion-MNIST by a fixed "
        "recipe: canvas i of a split (128-192 px a side, a coloured background with a wave "
        "texture) holds 1-4 garments at random sizes and places, all drawn from a generator "
        "seeded with (seed, split, i); `images/<split>/`, `labels/<split>/` (one `class cx cy "
        "w h` line per garment), `data.yaml` and `RECIPE.json` (the recipe and a digest of "
        "every file). Train and val canvases take training garments, test canvases test "
        "garments. `make fmnist-detect` builds 2,000 + 400 + 400 canvases."
    ),
    "jpeg-folder": (
        "Builds an image folder of RGB JPEGs from Fashion-MNIST by a fixed recipe: image i of "
        "a split gets two colours and a side in 140-200 px from a generator seeded with "
        "(seed, split, i), is resized with PIL bicubic and saved at a fixed quality, so the "
        "same Pillow rebuilds the folder bit-identically (`--dest/RECIPE.json` holds the "
        "recipe and a digest of every file). `make jpeg-folder` builds the 50,000 + 10,000 "
        "folder and its first 6,000 + 1,000."
    ),
    "bench-folder": (
        "The measured section of `make bench`, on real files: peak RSS of `cache-teacher` and "
        "`train-student` at the small and the large folder, `cache-teacher`'s rows/s against "
        "a bare loop of timm's own dataset and loader running the same teacher with the same "
        "workers, and a cached student epoch against the same student's hard-label epoch. "
        "Every measurement is a fresh subprocess, the arms alternated, the fastest of "
        "`--repeats` counted; writes [benchmarks.md](benchmarks.md)."
    ),
    "bench-detect": (
        "Issue 25's epoch-cost goals, measured side by side: the detection teacher cached "
        "dense and top-K (its pass and bytes per view), then every student trained on hard "
        "labels, from each cache and online, one after another in one process for `--repeats` "
        "rounds, the fastest epoch after the first counted; writes "
        "[benchmarks.md](benchmarks.md) (`make bench-detect`, the detect extra)."
    ),
    "evaluate": (
        "Test accuracy and errors, top-1 agreement with the teacher (from `--teacher` run "
        "directories, or from `--cache`, a cache of the same split), expected calibration "
        "error (15 bins), parameter count, and CPU latency (batch 1: rounds of 50 calls "
        "until the medians of the last four agree within 10 %, at most 600 calls; the median "
        "and p95 of those 200, their spread `latency_spread` and the load average per core "
        "`cpu_load`, with a note on screen when either is high) and throughput (batch 256). "
        "A table on screen, or `--format csv|json`, optionally into "
        "`--output`. Also the p95 latency, throughput at batch 64, size on disk and the "
        "thread count; an exported `.onnx` file gets the same columns from ONNX Runtime's CPU "
        "provider, so PyTorch runs and their float32 and int8 files compare side by side."
    ),
    "tune-bias": (
        "Hinton et al.'s fix for a class the transfer set left out: one bias added to those "
        "classes' logits, chosen on the run's validation rows (the `--val-fraction` it held "
        "out of training; a run without one is refused) as the grid value with the fewest "
        "validation errors, the smallest change on ties. The test split is scored before and "
        "after, overall and on those classes, into `RUN_DIR/bias.json`, which `report` shows."
    ),
    "report": (
        "Builds a table from run directories' own `metrics.csv`, `model.json` and "
        "`config.json` (final epoch). Runs whose folder names differ only by a trailing "
        "`-s<seed>` form one group (mean ± std). With `--baseline`, each distilled group gets "
        "Hinton's gap-recovery share `(baseline − student) / (baseline − teacher)` in test "
        "errors. `--markdown` replaces the text between `<!-- kdpipe:SECTION:begin/end -->` "
        "markers of a file (appending them when absent), leaving the rest as written; the "
        "section also lists the commands rebuilt from each group's `config.json`, the date "
        "and the machine. `--plot PNG` draws the training curves beside the tables: test "
        "errors and each loss term (the loss, CE, KL) against the epoch, one line per group "
        "(the mean over its seeds) with the seeds' range shaded, a panel only where some run "
        "has values; `--temperature-plot PNG` draws test errors against T."
    ),
    "verify": (
        "Checks a cache: the manifest (strict schema, known `format_version`), completion "
        "(status and every chunk's progress flag), every chunk's files and crc32c checksum, "
        "no NaN or Inf, every row a distribution (|logsumexp| ≤ 2e-2 for float16, 1e-4 for "
        "float32), labels in range; with `--data`, the dataset's fingerprint and labels "
        "(an image folder's or shards' fingerprint comes from their index, which keeps a "
        "file's digest while its size and modification time hold; `--rehash` reads every "
        "file again, names those whose bytes changed and corrects the index); "
        "with `--recompute N --teacher RUN_DIR ...`, a fresh teacher pass on N random "
        "samples against the stored values. Prints one line per check; exits with status 1 "
        "naming each chunk or sample at fault."
    ),
    "caches": (
        "Lists every kdpipe cache at or below the given paths with what produced it: "
        "`cache_id`, status, `teacher_id`, each teacher as `architecture@weights-hash`, "
        "the teacher's `generation` (0 trained on labels, 1 a student of a generation-0 cache, "
        "...), dataset, split, samples, views, classes, T, storage kind, dtype, size on disk "
        "and creation time. A cache whose manifest cannot be read is listed as `unreadable`."
    ),
    "lineage": (
        "Follows a run back: student → cache → teacher(s) → their cache → their teachers … → "
        "dataset, through every generation to the first teacher. Each link is `verified` (the "
        "file is where the record says and its hash, recomputed, matches), `missing` (not "
        "found), `recorded` (a cache that is gone, known from the manifest downstream, its "
        "`teacher_id` re-derived from the recorded teachers) or `MISMATCH` (found, but with "
        "other content; exit status 1). The walk goes on from the manifests' records where a "
        "run directory or a cache in the middle of the chain is gone. "
        "Given an exported `.onnx` file, the chain starts there: file (its metadata bound to "
        "its own graph's weights, refused when copied into another graph) → run (its weights "
        "hash against the one the file records) → for QAT, the float32 run it started "
        "from → cache → teacher(s) → dataset."
    ),
    "export": (
        "Writes a finished run as one ONNX file (torch's dynamo exporter, dynamic batch axis, "
        "weights inside the file: no `.onnx.data` beside it). ONNX Runtime then runs it on "
        "`--check-rows` test images against PyTorch and the largest logit difference is "
        "printed; beyond `--tolerance` nothing is written. The file's `metadata_props` hold, "
        "under the key `kdpipe`, the preprocessing (input size, mean, std, channels), class "
        "names, the run's weights hash and lineage (run, `cache_id`, `teacher_id`), and a "
        "digest of the file's own weights (every initializer, external data included) that "
        "`lineage` and `evaluate` recompute, so the block copied into another graph is "
        "refused. `--int8` "
        "adds ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 "
        "activations) calibrated on rows of the training split: the transfer rows of the "
        "run's cache in their stored views, never the test split; the method, rows and cache "
        "are recorded in the metadata. A run that learned from labels alone has no cache: "
        "give `--calibration-cache`."
    ),
    "qat": (
        "Quantization-aware distillation from the cache: a trained float32 student is "
        "fine-tuned with fake-quantized weights and activations (torchao's PT2E QAT, "
        "`prepare_qat_pt2e` with `X86InductorQuantizer`) against the cache's soft labels, with "
        "the float32 run's α and T and the same rows, views and replay as `train-student` "
        "(its training loop); the teacher is never loaded. The run directory (kind "
        "`qat-student`, lineage naming the cache and the float32 run) holds the QAT weights "
        "in the float32 module and `model.int8.onnx`: `convert_pt2e`'s int8 model exported "
        "as QDQ ONNX, checked against the converted model on test rows. QAT runs do not "
        "`--resume`."
    ),
}


def reference() -> str:
    runner = CliRunner()
    lines = [
        "# kdpipe command-line reference",
        "",
        HEADER,
        "",
        "```",
        runner.invoke(main, ["--help"]).output.rstrip(),
        "```",
        "",
    ]
    for name in main.commands:
        help_text = runner.invoke(main, [name, "--help"]).output.rstrip()
        lines += [f"## kdpipe {name}", "", INTRODUCTIONS[name], "", "```", help_text, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())

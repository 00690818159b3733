#!/usr/bin/env bash
# Used for the layout change (issue 13): run it on two checkouts and diff OUT/parity.txt.
# Parity for the layout refactor: the same caches and students before and after.
# usage: run.sh OUT   (run from the repo root; uses python -m kdpipe)
set -euo pipefail
OUT=$1; rm -rf "$OUT"; mkdir -p "$OUT"
K="python -m kdpipe"
export OMP_NUM_THREADS=1
D="--data synthetic"
$K train-teacher --model kd_cnn $D --epochs 2 --out $OUT/t >/dev/null
$K train-teacher --model kd_mlp --hidden-sizes 32,16 $D --epochs 2 --dropout 0.1 --jitter 1 --seed 1 --out $OUT/t2 >/dev/null
$K cache-teacher --teacher $OUT/t $D --temperature 4 --chunk-size 128 --out $OUT/fixed.zarr >/dev/null
$K cache-teacher --teacher $OUT/t --teacher $OUT/t2 $D --temperature 4 --chunk-size 128 --views 3 --augment crop-flip --mix mixup --out $OUT/views.zarr >/dev/null
$K cache-teacher --teacher $OUT/t $D --temperature 2 --chunk-size 100 --top-k 2 --views 2 --augment shift-flip --mix cutmix --subset 0.5 --out $OUT/topk.zarr >/dev/null
$K cache-teacher --teacher $OUT/t $D --split test --temperature 4 --out $OUT/test.zarr >/dev/null
$K train-student --model kd_mlp_30x2 --cache $OUT/fixed.zarr $D --alpha 0.1 --epochs 2 --out $OUT/s-fixed >/dev/null
$K train-student --model kd_cnn --cache $OUT/views.zarr $D --alpha 0.3 --temperature 3 --epochs 3 --val-fraction 0.2 --early-stopping 2 --out $OUT/s-views >/dev/null
$K train-student --model kd_mlp_30x2 --cache $OUT/topk.zarr $D --alpha 0.5 --epochs 2 --out $OUT/s-topk >/dev/null
$K train-student --model kd_mlp_30x2 --cache $OUT/views.zarr $D --alpha 0 --epochs 2 --cache-memory 100000 --out $OUT/s-stream 2>&1 | grep -i stream
$K train-student --model kd_mlp_30x2 --cache $OUT/fixed.zarr $D --alpha 1 --epochs 2 --sched step --warmup-epochs 1 --out $OUT/s-hard >/dev/null
$K distill-online --model kd_mlp_30x2 --teacher $OUT/t $D --alpha 0.2 --temperature 4 --augment flip --epochs 2 --out $OUT/s-online >/dev/null
$K train-teacher --model kd_mlp_30x2 $D --epochs 2 --subset 0.3 --augment shift-flip --mix cutmix --out $OUT/t-aug >/dev/null
$K evaluate $OUT/s-fixed $D --split test --cache $OUT/test.zarr --format json > $OUT/eval.json
$K verify $OUT/views.zarr --data synthetic > $OUT/verify.txt 2>&1 || true
$K caches $OUT > $OUT/caches.txt
# fingerprints
python - "$OUT" <<'PY'
import hashlib, json, sys, pathlib
out = pathlib.Path(sys.argv[1]); lines = []
for z in sorted(out.glob("*.zarr")):
    m = json.loads((z / "zarr.json").read_text())["attributes"]["kdpipe"]
    chunks = hashlib.sha256()
    for f in sorted(p for p in z.rglob("*") if p.is_file() and "/c/" in str(p)):
        chunks.update(str(f.relative_to(z)).encode()); chunks.update(f.read_bytes())
    lines.append(f"{z.name} cache_id={m['cache_id']} teacher_id={m['teacher_id']} acc={m['teacher_accuracy']} chunks={chunks.hexdigest()[:16]}")
for r in sorted(p for p in out.iterdir() if (p / "model.json").is_file()):
    c = json.loads((r / "model.json").read_text())
    import csv
    rows = list(csv.DictReader((r / "metrics.csv").open()))
    last = {k: rows[-1][k] for k in ("loss", "test_errors", "val_errors")}
    lines.append(f"{r.name} weights={c['weights_sha256'][:16]} last={last}")
(out / "parity.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

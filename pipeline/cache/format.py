"""The cache format, apart from any I/O: the manifest and how its ids are derived.

The manifest is a JSON object stored in the Zarr group's attributes under the
key ``kdpipe``. It is parsed strictly: unknown keys, missing keys and values of
the wrong type are errors that name the field. ``docs/cache-format.md`` is the
human-readable version of this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from kdpipe.base.checks import TEMPERATURE_RANGE, temperature_problem  # noqa: F401 (re-exported)
from kdpipe.base.errors import ManifestError
from kdpipe.base.spec import check_field as _check
from kdpipe.base.spec import check_keys, check_object
from kdpipe.cache.detection import (
    DetectionManifest,
    describe_detection_differences,
    detection_array_specs,
)
from kdpipe.cache.layout import STORAGE_KINDS, Layout, storage_layout

FORMAT_VERSION = 3  # 2: views, transfer-set rows, top-k storage; 3: chunk position digests
MANIFEST_KEY = "kdpipe"
CHECKSUM_KEY = "kdpipe_sha256"  # beside the manifest: SHA-256 of its canonical JSON
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUSES = (STATUS_WRITING, STATUS_COMPLETE)
COMBINE_RULES = ("mean-probs", "mean-logits")
DTYPES = ("float16", "float32")
PRECISIONS = ("float32", "bfloat16")
# the columns of the ``views`` array (float32, one row per sample and view): the explicit
# parameters of a view, replayed by kdpipe.views.inputs.render and drawn by kdpipe.views.policy
VIEW_FIELDS = (
    "top",  # crop box in the source image, as fractions of its height and width;
    "left",  # a box may reach outside the image (shifts): outside pixels are 0
    "height",
    "width",
    "flip",  # 1: mirrored left-right after cropping
    "lam",  # weight of this sample in the mix; 1 without mixing
    "box_top",  # cutmix: the partner's pixels replace this box of the output
    "box_left",  # (fractions of the output size; all 0 for mixup or no mixing)
    "box_height",
    "box_width",
)
VIEW_COLUMNS = {name: index for index, name in enumerate(VIEW_FIELDS)}
IDENTITY_VIEW = (0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # the plain image
VALUES = "log_softmax(logits / temperature)"
PREPROCESSING = (
    "uint8 pixels / 255, resized (bilinear) to the member's input_size when the dataset's "
    "differs, then (x - mean) / std per channel"
)
# a member with its own eval resize (a pretrained teacher's data_config has interpolation and
# crop_pct): written only then, so that the ids of every other cache stay what they were
EVAL_PREPROCESSING = PREPROCESSING + (
    "; a member whose data_config has interpolation and crop_pct: first timm's eval transform "
    "per image (PIL), Resize(floor(size / crop_pct), interpolation, antialias) then "
    "CenterCrop(size) (crop_mode squash: both edges resized; border: longest edge, padded), "
    "stored views rendered at input_size as for every member"
)


def preprocessing_for(data_configs: list[dict]) -> str:
    """The manifest's ``preprocessing``: how its members' inputs are made."""
    evals = any("interpolation" in c or "crop_pct" in c for c in data_configs)
    return EVAL_PREPROCESSING if evals else PREPROCESSING


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """Where a member that is itself a student learned from: the cache it was trained on,
    with that cache's own teachers (and so, recursively, theirs). Recorded in the manifest
    so that ``kdpipe lineage`` can walk a chain back to its first teacher after the run
    directories in the middle of it are gone. ``combine``, ``dataset`` and ``teachers``
    are None when the upstream cache could not be read when this cache was written."""

    cache_id: str
    teacher_id: str
    cache_path: str
    combine: str | None
    dataset: dict | None  # name, split, fingerprint of the upstream cache
    teachers: tuple[TeacherMember, ...] | None

    def to_dict(self) -> dict:
        return {
            "cache_id": self.cache_id,
            "teacher_id": self.teacher_id,
            "cache_path": self.cache_path,
            "combine": self.combine,
            "dataset": self.dataset,
            "teachers": None
            if self.teachers is None
            else [member.to_dict() for member in self.teachers],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Upstream:
        check_object(data, where)
        check_keys(data, cls, where)
        teachers = _check(data, "teachers", (list, type(None)), where)
        combine = _check(data, "combine", (str, type(None)), where)
        if combine is not None and combine not in COMBINE_RULES:
            raise ManifestError(f"{where}: combine {combine!r} is not one of "
                                f"{', '.join(COMBINE_RULES)}")  # fmt: skip
        if teachers is not None and (not teachers or combine is None):
            raise ManifestError(f"{where}: teachers need a combine rule and at least one member")
        return cls(
            cache_id=_check(data, "cache_id", str, where),
            teacher_id=_check(data, "teacher_id", str, where),
            cache_path=_check(data, "cache_path", str, where),
            combine=combine,
            dataset=_check(data, "dataset", (dict, type(None)), where),
            teachers=None
            if teachers is None
            else tuple(
                TeacherMember.from_dict(t, f"{where}: teachers[{i}]")
                for i, t in enumerate(teachers)
            ),
        )

    def consistent(self) -> bool:
        """The recorded teacher_id is the one its recorded teachers give (True when the
        teachers were not recorded: nothing to contradict it)."""
        if self.teachers is None:
            return True
        return derive_teacher_id(list(self.teachers), self.combine) == self.teacher_id


@dataclass(frozen=True, kw_only=True)
class TeacherMember:
    """One teacher network: enough to rebuild it and to check its weights."""

    architecture: str
    weights_sha256: str
    param_count: int
    model_kwargs: dict
    num_classes: int
    data_config: dict  # input_size, mean, std
    run_dir: str  # where it was loaded from; a hint, the hash is the identity
    # a student used as a teacher: the cache it learned from (None: trained on labels).
    # Provenance, not identity: the weights hash already names the teacher, so neither
    # teacher_id nor cache_id depends on it
    lineage: Upstream | None = None
    # a pretrained teacher: its SOURCE (timm:, hf-hub:, local-dir:), pretrained_cfg, weights
    # file and that file's SHA-256. Provenance too, in no id
    source: dict | None = None

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in _MEMBER_FIELDS}
        if self.lineage is not None:  # absent, not null: generation-0 records stay as they were
            data["lineage"] = self.lineage.to_dict()
        if self.source is not None:  # absent, not null, for the same reason
            data["source"] = dict(self.source)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "teacher") -> TeacherMember:
        check_object(data, where)
        check_keys(data, cls, where, require=False)  # a missing field is named as it is read
        lineage = data.get("lineage")
        return cls(
            architecture=_check(data, "architecture", str, where),
            weights_sha256=_check(data, "weights_sha256", str, where),
            param_count=_check(data, "param_count", int, where),
            model_kwargs=_check(data, "model_kwargs", dict, where),
            num_classes=_check(data, "num_classes", int, where),
            data_config=_check(data, "data_config", dict, where),
            run_dir=_check(data, "run_dir", str, where),
            lineage=None if lineage is None else Upstream.from_dict(lineage, f"{where}: lineage"),
            source=_check(data, "source", dict, where) if "source" in data else None,
        )

    @property
    def generation(self) -> int | None:
        """0: trained on labels; 1 + its teacher's generation for a student; None when the
        chain above it was not recorded."""
        if self.lineage is None:
            return 0
        return _generation(self.lineage.teachers)


_MEMBER_FIELDS = ("architecture", "weights_sha256", "param_count", "model_kwargs",
                  "num_classes", "data_config", "run_dir")  # fmt: skip


def _generation(members: tuple[TeacherMember, ...] | None) -> int | None:
    """One more than the highest generation of a cache's teachers (None: unknown)."""
    if members is None:
        return None
    generations = [member.generation for member in members]
    return None if None in generations else 1 + max(generations)


def derive_teacher_id(members: list[TeacherMember], combine: str) -> str:
    """Stable id of a teacher: what each member computes and how they are combined.

    Member order does not matter (both combine rules are symmetric); run_dir
    and param_count are not part of it (a moved file is the same teacher).
    """
    identities = sorted(
        _digest([m.architecture, m.weights_sha256, m.model_kwargs, m.data_config]) for m in members
    )
    return _digest({"members": identities, "combine": combine if len(members) > 1 else "single"})


LAYER_KINDS = ("features", "attention")
FEATURE_DTYPE = "float16"


@dataclass(frozen=True, kw_only=True)
class CachedLayer:
    """One cached intermediate output of the teacher: its array holds, per row and view,
    the layer's output (``features``) or its attention map (``attention``, Zagoruyko &
    Komodakis 2017: the channel mean of the squared activations, flattened, L2-normalised)
    for exactly the view the logits are for, from the same forward pass."""

    name: str  # the layer: a module name of the teacher's feature_info, or "pre_logits"
    kind: str  # features or attention
    array: str  # the array's name in the group
    shape: list  # per row and view: (C, H, W), (D,), (L, D); (H*W,) for attention
    pooling: str  # "none", or "adaptive-avg GxG" (--feature-grid)
    dtype: str = FEATURE_DTYPE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CachedLayer:
        check_object(data, where)
        check_keys(data, cls, where)
        layer = cls(**{name: _check(data, name, kind, where) for name, kind in (
            ("name", str), ("kind", str), ("array", str), ("shape", list), ("pooling", str),
            ("dtype", str))})  # fmt: skip
        if layer.kind not in LAYER_KINDS:
            raise ManifestError(f"{where}: kind {layer.kind!r} is not one of features, attention")
        if layer.dtype != FEATURE_DTYPE:
            raise ManifestError(f"{where}: dtype {layer.dtype!r} is not {FEATURE_DTYPE}")
        if layer.array != layer_array(layer.kind, layer.name):
            raise ManifestError(f"{where}: array {layer.array!r} is not "
                                f"{layer_array(layer.kind, layer.name)!r}")  # fmt: skip
        if not layer.shape or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in layer.shape
        ):
            raise ManifestError(f"{where}: shape {layer.shape!r} is not a list of sizes >= 1")
        return layer


def layer_array(kind: str, name: str) -> str:
    """The array a cached layer is stored in: ``feature_NAME`` or ``attention_NAME``."""
    return f"{'feature' if kind == 'features' else 'attention'}_{name}"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything that produced a cache, and whether it is finished."""

    format_version: int
    status: str
    cache_id: str
    teacher_id: str
    teachers: tuple[TeacherMember, ...]
    combine: str
    temperature: float
    values: str
    preprocessing: str
    dataset: dict  # name, split, fingerprint {count, num_classes, classes, sha256}
    classes: list  # the teacher's class names, index = class id
    transfer: dict  # which dataset rows: dataset_samples, subset, exclude_classes, labeled
    seed: int  # drew the transfer subset and the views
    views: dict  # augment, mix, mix_alpha: how the view parameters were drawn
    storage: dict  # kind "dense" or "top-k", k
    num_samples: int  # rows: the transfer set
    num_views: int
    num_classes: int
    dtype: str
    chunk_size: int
    array_metadata_sha256: dict  # array name -> SHA-256 of its zarr.json
    teacher_accuracy: float | None
    software: dict
    created: str
    completed: str | None
    # the teacher's forward precision: "float32", or "bfloat16" (autocast, on CUDA by
    # default); a cache written before this field existed was float32
    precision: str = "float32"
    # intermediate outputs cached beside the logits (--features, --attention); absent from
    # the manifest when there are none, so a cache without them is what it was
    features: tuple[CachedLayer, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["teachers"] = [member.to_dict() for member in self.teachers]
        if self.features:
            data["features"] = [layer.to_dict() for layer in self.features]
        else:
            del data["features"]
        return data

    def layer(self, kind: str, name: str) -> CachedLayer | None:
        """The cached layer of ``kind`` named ``name``, or None."""
        return next((x for x in self.features if (x.kind, x.name) == (kind, name)), None)

    def describe_layers(self) -> str:
        """The cached layers for a message: ``features.3 (features), features.7 (attention)``,
        or ``none``."""
        return ", ".join(f"{x.name} ({x.kind})" for x in self.features) or "none"

    @property
    def teacher_generation(self) -> int | None:
        """The generation of the cache's teacher: 0 trained on labels, 1 a student of a
        generation-0 cache, ... (the highest of an ensemble's members; None: unknown)."""
        generations = [member.generation for member in self.teachers]
        return None if None in generations else max(generations)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        # longer than a screen on purpose: one line per field, each checked where it is read
        check_object(data, where)
        version = _check(data, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {version} is not supported "
                f"(this kdpipe reads version {FORMAT_VERSION})"
            )
        check_keys(data, cls, where, require=False)
        teachers = _check(data, "teachers", list, where)
        if not teachers:
            raise ManifestError(f"{where}: field 'teachers' is empty")
        manifest = cls(
            format_version=version,
            status=_check(data, "status", str, where),
            cache_id=_check(data, "cache_id", str, where),
            teacher_id=_check(data, "teacher_id", str, where),
            teachers=tuple(
                TeacherMember.from_dict(t, f"{where}: teachers[{i}]")
                for i, t in enumerate(teachers)
            ),
            combine=_check(data, "combine", str, where),
            temperature=float(_check(data, "temperature", (int, float), where)),
            values=_check(data, "values", str, where),
            preprocessing=_check(data, "preprocessing", str, where),
            dataset=_check(data, "dataset", dict, where),
            classes=_check(data, "classes", list, where),
            transfer=_check(data, "transfer", dict, where),
            seed=_check(data, "seed", int, where),
            views=_check(data, "views", dict, where),
            storage=_check(data, "storage", dict, where),
            num_samples=_check(data, "num_samples", int, where),
            num_views=_check(data, "num_views", int, where),
            num_classes=_check(data, "num_classes", int, where),
            dtype=_check(data, "dtype", str, where),
            chunk_size=_check(data, "chunk_size", int, where),
            array_metadata_sha256=_check(data, "array_metadata_sha256", dict, where),
            teacher_accuracy=_check(data, "teacher_accuracy", (int, float, type(None)), where),
            software=_check(data, "software", dict, where),
            created=_check(data, "created", str, where),
            completed=_check(data, "completed", (str, type(None)), where),
            precision=_check(data, "precision", str, where) if "precision" in data else "float32",
            features=_parse_layers(data, where),
        )
        for name, value, allowed in (
            ("status", manifest.status, STATUSES),
            ("combine", manifest.combine, COMBINE_RULES),
            ("dtype", manifest.dtype, DTYPES),
            ("precision", manifest.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ManifestError(f"{where}: {name} {value!r} is not one of {', '.join(allowed)}")
        problem = temperature_problem(manifest.temperature, "temperature")
        if problem:
            raise ManifestError(f"{where}: {problem}")
        for key in ("name", "split", "fingerprint"):
            if key not in manifest.dataset:
                raise ManifestError(f"{where}: dataset has no {key!r}")
        if "decode" in manifest.dataset:  # absent: a set in memory, or a cache older than it
            parse_decode(manifest.dataset["decode"], f"{where}: dataset.decode")
        for name, keys in (
            ("transfer", ("dataset_samples", "subset", "exclude_classes", "labeled")),
            ("views", ("augment", "mix", "mix_alpha")),
            ("storage", ("kind", "k")),
        ):
            missing = [key for key in keys if key not in getattr(manifest, name)]
            if missing:
                raise ManifestError(f"{where}: {name} has no {', '.join(map(repr, missing))}")
        crop_scale = manifest.views.get("crop_scale")  # absent: the default range
        if crop_scale is not None and not (
            isinstance(crop_scale, list)
            and len(crop_scale) == 2
            and all(isinstance(v, int | float) for v in crop_scale)
            and 0 < crop_scale[0] <= crop_scale[1] <= 1
        ):
            raise ManifestError(f"{where}: views crop_scale {crop_scale!r} is not [MIN, MAX]")
        kind, k = manifest.storage["kind"], manifest.storage["k"]
        if kind not in STORAGE_KINDS:
            raise ManifestError(f"{where}: storage kind {kind!r} is not one of dense, top-k")
        if kind == "top-k" and not (isinstance(k, int) and 1 <= k <= manifest.num_classes):
            raise ManifestError(f"{where}: storage k {k!r} is not in 1..{manifest.num_classes}")
        if len(manifest.classes) != manifest.num_classes:
            raise ManifestError(
                f"{where}: {len(manifest.classes)} class names for {manifest.num_classes} classes"
            )
        return manifest

    @property
    def layout(self) -> Layout:
        """How the teacher's distribution is stored (:mod:`kdpipe.cache.layout`)."""
        return storage_layout(self.storage, self.num_classes)

    @property
    def has_views(self) -> bool:
        """False when every view is the plain image (no augmentation, no mixing)."""
        return not (self.views["augment"] == "none" and self.views["mix"] == "none")

    @property
    def labeled(self) -> bool:
        return bool(self.transfer["labeled"])

    def identity(self) -> dict:
        """The fields the ``cache_id`` is derived from: same inputs, same id."""
        return {
            "format_version": self.format_version,
            "teacher_id": self.teacher_id,
            "temperature": self.temperature,
            "preprocessing": self.preprocessing,
            "dataset_sha256": self.dataset["fingerprint"]["sha256"],
            "split": self.dataset["split"],
            "num_views": self.num_views,
            "dtype": self.dtype,
            "seed": self.seed,
            "views": self.views,
            "transfer": self.transfer,
            "storage": self.storage,
            # only when not float32, so that the ids of float32 caches stay what they were
            **({"precision": self.precision} if self.precision != "float32" else {}),
            # only with cached layers: the ids of caches without them stay what they were
            **({"features": [x.to_dict() for x in self.features]} if self.features else {}),
        }


# how a folder's or shards' files became the cached rows' pixels (kdpipe.data.imagefolder's
# RESIZE_MODES: crop keeps the aspect ratio, squash stretches)
DECODE_KEYS = ("size", "channels", "resize")
RESIZE_MODES = ("crop", "squash")


def parse_decode(data: Any, where: str) -> dict:
    """The dataset record's ``decode``: ``size`` [H, W] (positive integers), ``channels``
    1 or 3, ``resize`` one of :data:`RESIZE_MODES`; anything else names the field."""
    check_object(data, where)
    unknown, missing = (
        sorted(set(data) - set(DECODE_KEYS)),
        [k for k in DECODE_KEYS if k not in data],
    )
    if unknown or missing:
        what = f"unknown field {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise ManifestError(f"{where}: {what}")
    size = data["size"]
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ManifestError(f"{where}: size {size!r} is not [HEIGHT, WIDTH]")  # fmt: skip
    if data["channels"] not in (1, 3) or isinstance(data["channels"], bool):
        raise ManifestError(f"{where}: channels {data['channels']!r} is not 1 or 3")
    if data["resize"] not in RESIZE_MODES:
        raise ManifestError(f"{where}: resize {data['resize']!r} is not one of "
                            f"{', '.join(RESIZE_MODES)}")  # fmt: skip
    return data


def _parse_layers(data: dict, where: str) -> tuple[CachedLayer, ...]:
    """The manifest's optional ``features``: each layer parsed strictly, none twice."""
    if "features" not in data:
        return ()
    layers = tuple(
        CachedLayer.from_dict(layer, f"{where}: features[{i}]")
        for i, layer in enumerate(_check(data, "features", list, where))
    )
    arrays = [layer.array for layer in layers]
    if len(set(arrays)) != len(arrays):
        raise ManifestError(f"{where}: features lists one layer twice ({', '.join(arrays)})")
    return layers


def field_problems(manifest: Manifest) -> list[str]:
    """What the manifest's fields outside the ``cache_id`` contradict, in each other or in
    the fields it is derived from (an empty list: nothing). ``verify`` reports them; the
    fields it recomputes from the arrays (shapes, chunks, teacher accuracy) and from the
    teacher (classes, parameter counts) are checked there. docs/cache-format.md lists
    every field and which of the two covers it."""
    problems = []
    if manifest.values != VALUES:
        problems.append(f"values {manifest.values!r} is not {VALUES!r}")
    samples, fingerprint = manifest.transfer["dataset_samples"], manifest.dataset["fingerprint"]
    if not isinstance(fingerprint, dict) or fingerprint.get("count") != samples:
        count = fingerprint.get("count") if isinstance(fingerprint, dict) else fingerprint
        problems.append(f"dataset fingerprint count {count!r} is not transfer.dataset_samples "
                        f"{samples!r}")  # fmt: skip
    elif manifest.labeled and fingerprint.get("num_classes") != manifest.num_classes:
        problems.append(f"dataset fingerprint num_classes {fingerprint.get('num_classes')!r} "
                        f"is not num_classes {manifest.num_classes}")  # fmt: skip
    if isinstance(samples, int) and not 0 < manifest.num_samples <= samples:
        problems.append(f"num_samples {manifest.num_samples} is not 1..{samples} rows of the "
                        "dataset")  # fmt: skip
    if not 1 <= manifest.chunk_size <= max(manifest.num_samples, 1):
        problems.append(f"chunk_size {manifest.chunk_size} is not 1..{manifest.num_samples}")
    for i, member in enumerate(manifest.teachers):
        if member.num_classes != manifest.num_classes:
            problems.append(f"teachers[{i}] has {member.num_classes} classes, the cache "
                            f"{manifest.num_classes}")  # fmt: skip
        if member.lineage is not None and not member.lineage.consistent():
            problems.append(f"teachers[{i}]: lineage teacher_id {member.lineage.teacher_id} is "
                            "not the one its recorded teachers give")  # fmt: skip
    if (manifest.status == STATUS_COMPLETE) != (manifest.completed is not None):
        problems.append(f"status {manifest.status!r} with completed {manifest.completed!r}")
    accuracy = manifest.teacher_accuracy
    if accuracy is not None and not (manifest.labeled and 0 <= accuracy <= 1):
        kind = "labeled" if manifest.labeled else "label-free"
        problems.append(f"teacher_accuracy {accuracy!r} for a {kind} transfer set")
    return problems


def manifest_checksum(data: dict) -> str:
    """SHA-256 of a manifest's canonical JSON: any edited or flipped byte changes it."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def derive_cache_id(manifest: Manifest) -> str:
    return _digest(manifest.identity())


def describe_differences(
    existing: Manifest | DetectionManifest, wanted: Manifest | DetectionManifest
) -> list[str]:
    """What makes ``existing`` another cache than the one ``wanted`` describes, field by field.

    An empty list means the same cache: a partial one can be resumed.
    """
    detection = (isinstance(existing, DetectionManifest), isinstance(wanted, DetectionManifest))
    if detection[0] != detection[1]:
        kinds = ["a classification cache", "a detection cache"]
        return [f"{kinds[detection[0]]}, not {kinds[detection[1]]}"]
    if detection[0]:
        return describe_detection_differences(existing, wanted)
    differences = []
    existing_members = [(m.architecture, m.weights_sha256[:12]) for m in existing.teachers]
    wanted_members = [(m.architecture, m.weights_sha256[:12]) for m in wanted.teachers]
    if existing.teacher_id != wanted.teacher_id:
        differences.append(f"teacher {existing_members} != {wanted_members}")
    old_data, new_data = existing.dataset, wanted.dataset
    if (old_data["name"], old_data["split"]) != (new_data["name"], new_data["split"]):
        differences.append(
            f"data {old_data['name']} {old_data['split']} != {new_data['name']} {new_data['split']}"
        )
    elif old_data["fingerprint"] != new_data["fingerprint"]:
        differences.append("data fingerprint differs (same name and split, other content)")
    # dataset_samples follows from the fingerprint: a data difference is already named
    old_transfer = {k: v for k, v in existing.transfer.items() if k != "dataset_samples"}
    new_transfer = {k: v for k, v in wanted.transfer.items() if k != "dataset_samples"}
    if old_transfer != new_transfer:
        differences.append(f"transfer set {old_transfer} != {new_transfer}")
    for name in (
        "temperature",
        "combine",
        "num_views",
        "views",
        "seed",
        "storage",
        "dtype",
        "chunk_size",
        "preprocessing",
        "precision",
        "features",
    ):
        old, new = getattr(existing, name), getattr(wanted, name)
        if old != new:
            differences.append(f"{name} {old} != {new}")
    if not differences and existing.format_version != wanted.format_version:
        differences.append(f"format_version {existing.format_version} != {wanted.format_version}")
    return differences


def array_specs(
    manifest: Manifest | DetectionManifest,
) -> dict[str, tuple[tuple[int, ...], str, int | float]]:
    """Every data array of a cache: name -> (shape, dtype, fill value).

    All are chunked along the first (row) axis by ``chunk_size``; the writer,
    the reader and ``kdpipe verify`` all take the layout from here (a detection cache's
    arrays: :func:`kdpipe.cache.detection.detection_array_specs`).
    """
    if isinstance(manifest, DetectionManifest):
        return detection_array_specs(manifest)
    n, v = manifest.num_samples, manifest.num_views
    return {
        **manifest.layout.arrays(n, v, manifest.dtype),
        "labels": ((n,), "int64", -1),
        "indices": ((n,), "int64", -1),
        "views": ((n, v, len(VIEW_FIELDS)), "float32", 0.0),
        "partners": ((n, v), "int64", -1),
        # last, so that the digests of the arrays above keep their positions
        **{x.array: ((n, v, *x.shape), x.dtype, 0.0) for x in manifest.features},
    }

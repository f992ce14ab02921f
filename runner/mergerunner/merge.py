"""Linear merge θ = Σ wᵢ θᵢ of validated checkpoints, accumulated in float32, to a directory.

`merge_to_directory` checks the inputs and weights, plans the output files, streams the merge
into a staging directory and publishes it. The pieces, each in its own module:

* `mergerunner.arithmetic`: the one per-element arithmetic (`acc = 0; acc += wᵢ·xᵢ` in
  float32, one rounding to the output dtype) and what a non-finite result means;
* `mergerunner.writer`: the safetensors shards (headers computed first from the known shapes,
  then every span written at its known offset), the index, config and side files;
* `mergerunner.stream`: windows mapped from every input, merged, hashed and written by a few
  workers, so memory stays a few tens of MiB whatever the model;
* `mergerunner.digest`: the content digest, computed while writing;
* `mergerunner.resident_merge`: `ResidentMerger`, which keeps every checkpoint in memory once
  and writes a merge straight into a loaded model, so that a search evaluates a candidate
  without touching the disk. Same arithmetic, hence bit-identical tensors and equal digests.

See docs/merge.md.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mergerunner.arithmetic import output_dtype
from mergerunner.checkpoint import MergePlan, validate_checkpoints
from mergerunner.stream import stream_merge
from mergerunner.trial import FailureKind
from mergerunner.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    RECIPE_KEY,
    check_destination,
    copy_side_files,
    plan_shards,
    publish,
    write_index,
)


class MergeWeightsError(ValueError):
    """The weights do not fit the checkpoints: wrong count or not finite."""

    failure_kind = FailureKind.INVALID_INPUT


@dataclass(frozen=True)
class MergeReport:
    """What `merge_to_directory` wrote, and how long each phase took."""

    out_dir: Path
    digest: str
    bytes_written: int
    files: tuple[str, ...]
    tensors: int
    dtype: str
    weights: tuple[float, ...]
    recipe: Mapping[str, Any]
    seconds: Mapping[str, float] = field(default_factory=dict)


def validate_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Check one finite real weight per checkpoint. Any real is allowed: the search may use an
    unconstrained parameterisation, so sums other than 1 and negative weights are legitimate."""
    values = list(weights)
    if len(values) != count:
        raise MergeWeightsError(f"expected {count} weights (one per checkpoint), got {len(values)}")
    out = []
    for i, value in enumerate(values):
        try:
            if isinstance(value, (str, bytes, bool)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise MergeWeightsError(f"weight {i} is {value!r}, not a real number") from None
        if not math.isfinite(number) or not _finite_in_float32(number):
            raise MergeWeightsError(
                f"weight {i} is {number}; weights must be finite in float32 (|w| < 3.4e38), "
                "the precision the merge multiplies in"
            )
        out.append(number)
    return tuple(out)


def _finite_in_float32(value: float) -> bool:
    """Whether `value` stays finite when rounded to float32 (torch casts `alpha` so)."""
    try:
        struct.pack("<f", value)
    except OverflowError:
        return False
    return True


def library_version() -> str:
    try:
        return metadata.version("mergesearch")
    except metadata.PackageNotFoundError:
        return "unknown"


def merge_recipe(
    plan: MergePlan, weights: Sequence[float], dtype: str, names: Sequence[str]
) -> dict[str, Any]:
    """The merge's provenance, stored in every output file so a model explains itself."""
    return {
        "method": "linear",
        "checkpoints": [
            {"name": name, "path": str(layout.path)}
            for name, layout in zip(names, plan.checkpoints, strict=True)
        ],
        "weights": list(weights),
        "dtype": dtype,
        "accumulation": "float32",
        "library": "mergesearch",
        "version": library_version(),
    }


def merge_to_directory(
    checkpoint_dirs: Sequence[Path],
    weights: Sequence[float],
    out_dir: Path,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    checkpoint_names: Sequence[str] | None = None,
    threads: int = 2,
) -> MergeReport:
    """Write Σ wᵢ θᵢ of the checkpoints to `out_dir` as an HF-format model directory.

    Everything is validated before anything is written; the output is assembled in a sibling
    temporary directory and renamed into place only once complete, so `out_dir` either does not
    exist or holds a whole merge. `out_dir` must not exist or be an empty directory.
    `threads` accumulate spans in parallel, besides one thread mapping inputs and one writing.
    """
    begin = time.perf_counter()
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this host is not")
    out_torch, code = output_dtype(dtype)
    plan = validate_checkpoints([Path(p) for p in checkpoint_dirs])
    values = validate_weights(weights, len(plan.checkpoints))
    names = _names(plan, checkpoint_names)
    out_dir = Path(out_dir)
    check_destination(out_dir)
    recipe = merge_recipe(plan, values, dtype, names)
    meta = {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    shards = plan_shards(plan.tensors, code, max_shard_bytes, meta)
    validated = time.perf_counter()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        digest, written = stream_merge(
            plan, shards, values, out_torch, code, staging, max(1, threads)
        )
        merged = time.perf_counter()
        if len(shards) > 1:
            written += write_index(staging, shards, recipe)
        copy_side_files(plan, staging, dtype)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    end = time.perf_counter()
    return MergeReport(
        out_dir=out_dir,
        digest=digest,
        bytes_written=written,
        files=tuple(sorted(p.name for p in out_dir.iterdir())),
        tensors=len(plan.tensors),
        dtype=dtype,
        weights=values,
        recipe=recipe,
        seconds={
            "validate": validated - begin,
            "merge": merged - validated,
            "finalize": end - merged,
            "total": end - begin,
        },
    )


def _names(plan: MergePlan, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [layout.path.name for layout in plan.checkpoints]
    if len(names) != len(plan.checkpoints):
        raise ValueError(f"{len(names)} checkpoint names for {len(plan.checkpoints)} checkpoints")
    return [str(n) for n in names]

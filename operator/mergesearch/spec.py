"""The MergeSearch resource's `spec`: one model, with defaults and field-naming validation.

This model is the single source of truth for the resource's shape: the CRD's openAPI schema is
generated from it (`mergesearch.crd`), and a test fails if the committed CRD drifts. Local mode
and the operator both validate manifests with it, so a manifest that runs with
`mergesearch run` also applies to a cluster, and vice versa.

Task, checkpoint and evaluator entries reuse the runner's trial contract, so the operator never
translates a task between two slightly different definitions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from mergerunner.trial import (
    TERMINATION_MESSAGE_LIMIT,
    CheckpointRef,
    Dtype,
    EvaluatorSpec,
    TaskSpec,
    packed_result_bytes,
)

API_GROUP = "mergesearch.io"
API_VERSION = "v1alpha1"
KIND = "MergeSearch"

Baseline = Literal["each", "uniform", "merge-best"]
# How a cluster runs candidates: one Job per trial, or warm evaluators that keep the
# checkpoints and one model resident across candidates (docs/operator.md, "Warm evaluators").
ExecutionMode = Literal["jobs", "warm"]


class _Spec(BaseModel):
    """camelCase on the wire; unknown fields are errors (a typo must not silently vanish)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class MergeSpec(_Spec):
    method: Literal["linear"] = Field(default="linear", description="Merge method.")
    parameterization: Literal["simplex", "unconstrained"] = Field(
        default="simplex",
        description="simplex: non-negative weights summing to 1 (the paper's); unconstrained: "
        "any real weights.",
    )
    dtype: Dtype = Field(default="bfloat16", description="Data type of the merged model.")


# A Kubernetes object name (RFC 1123 subdomain), as Secrets and ConfigMaps must have.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class LocalObjectRef(_Spec):
    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=OBJECT_NAME_PATTERN,
        description="Object name (lower-case letters, digits, '-' and '.'), same namespace.",
    )


class CustomTasks(_Spec):
    """Where custom lm-eval task YAMLs come from: a ConfigMap on a cluster, a path locally."""

    config_map_ref: LocalObjectRef | None = Field(
        default=None, description="ConfigMap whose keys are task YAML (and data) files."
    )
    path: str | None = Field(
        default=None,
        description="Local directory of task YAMLs (local mode only: on a cluster the search "
        "fails with SpecInvalid; use configMapRef).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CustomTasks:
        if (self.config_map_ref is None) == (self.path is None):
            raise ValueError("set exactly one of configMapRef and path")
        return self


class DatasetsSpec(_Spec):
    """Where the data bundle of the registry tasks lives (docs/deploy.md: building one)."""

    uri: str = Field(
        min_length=1,
        description="s3://, gs://, az://, file:// or a local path to a bundle written by "
        "`mergesearch datasets pack`; fetched with the storage credentials of checkpoints.",
    )


class ObjectiveSpec(_Spec):
    held_in: list[TaskSpec] = Field(
        min_length=1, description="Tasks whose weighted mean score the search maximises."
    )
    held_out: list[TaskSpec] = Field(
        default_factory=list, description="Tasks scored for the best merge only, never optimised."
    )
    custom_tasks: CustomTasks | None = Field(default=None, description="Custom task YAMLs.")
    datasets: DatasetsSpec | None = Field(
        default=None,
        description="Data bundle for lm-eval registry tasks (gsm8k, mbpp, ifeval, groups): "
        "trials never reach a hub.",
    )
    allow_code_execution: bool = Field(
        default=False,
        description="Allow tasks that execute model-generated code (mbpp, humaneval); each "
        "program runs in a sandboxed child process (docs/trial-contract.md).",
    )
    evaluator: EvaluatorSpec = Field(default_factory=EvaluatorSpec)

    @model_validator(mode="after")
    def _unique_tasks(self) -> ObjectiveSpec:
        names = [t.task for t in (*self.held_in, *self.held_out)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"each task may appear once across heldIn and heldOut: {twice}")
        for field, tasks in (("heldIn", self.held_in), ("heldOut", self.held_out)):
            needed = packed_result_bytes([t.task for t in tasks])
            if needed > TERMINATION_MESSAGE_LIMIT:
                raise ValueError(
                    f"{field}: the scores of {len(tasks)} tasks may need {needed} bytes in a "
                    f"trial's termination message (limit {TERMINATION_MESSAGE_LIMIT}) even "
                    "packed; use fewer or shorter task names (or an lm-eval group)"
                )
        return self


class ConfirmSpec(_Spec):
    """Re-scoring of the finalists on held-in examples the search never saw.

    The search's best is selected on its own examples, so its score there is biased upwards
    (the winner's curse); a fresh, disjoint sample of each held-in task picks the winner
    without that bias.
    """

    enabled: bool = Field(
        default=True,
        description="When the search ends, score the best topK candidates and every baseline "
        "on a seeded subset of each held-in task disjoint from the search's (as many examples "
        "as the task's limit, fewer if fewer remain) and choose the winner on those scores. "
        "Needs a limit on every held-in task.",
    )
    top_k: int = Field(
        default=5, ge=1, le=16, description="Search candidates confirmed (the best by fitness)."
    )


class SearchSpec(_Spec):
    population_size: int | None = Field(
        default=None, ge=3, le=1000, description="CMA-ES population; default 4+⌊3 ln N⌋."
    )
    sigma0: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Initial CMA-ES step size; default 1.0 on the simplex (log-ratio units), "
        "0.5/N unconstrained (weight units).",
    )
    max_generations: int = Field(default=30, ge=1, le=100000, description="Generation budget.")
    max_trials: int = Field(default=400, ge=1, le=1000000, description="Trial budget.")
    target_fitness: float | None = Field(default=None, description="Stop at this fitness.")
    stagnation_generations: int | None = Field(
        default=None, ge=1, description="Stop after this many generations without improvement."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the whole search.")
    start: Literal["uniform", "best-baseline"] = Field(
        default="uniform",
        description="Initial CMA-ES mean. uniform: the uniform merge, with generation 0 "
        "evaluated alongside the baselines; best-baseline: halfway between the best baseline "
        "and the uniform merge, once the baselines are in.",
    )
    baselines: list[Baseline] = Field(
        default_factory=lambda: ["each", "uniform", "merge-best"],
        description="Baselines evaluated before the search.",
    )
    failure_policy: Literal["penalize", "resample"] = Field(
        default="penalize",
        description="penalize: a failed candidate scores the worst fitness seen; resample: it "
        "is replaced by a new sample.",
    )
    confirm: ConfirmSpec = Field(
        default_factory=ConfirmSpec,
        description="Confirmation of the finalists on unseen examples (costs topK + the "
        "baselines' evaluations beyond maxTrials).",
    )

    @model_validator(mode="after")
    def _checks(self) -> SearchSpec:
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError("baselines: each baseline may be listed once")
        if self.start == "best-baseline" and not self.baselines:
            raise ValueError("start: best-baseline needs at least one baseline")
        if self.target_fitness is not None and not math.isfinite(self.target_fitness):
            raise ValueError("targetFitness must be a finite number")
        return self


class ExecutionSpec(_Spec):
    mode: ExecutionMode = Field(
        default="jobs",
        description="jobs: one Job per trial; warm: evaluator pods that fetch the checkpoints "
        "once and merge each candidate into a resident model.",
    )
    parallelism: int = Field(
        default=4, ge=1, le=1000, description="Concurrent trials (warm: evaluator pods)."
    )
    max_failed_trials: int = Field(
        default=8, ge=0, description="Failed trials tolerated before the search fails."
    )
    trial_timeout_seconds: int = Field(
        default=7200, ge=1, description="activeDeadlineSeconds of each trial Job."
    )
    backoff_limit: int = Field(default=1, ge=0, le=10, description="Retries of a trial's pod.")
    template: dict[str, Any] | None = Field(
        default=None,
        description="Pod template for trial Jobs (image, resources, node selector, …).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class StorageSpec(_Spec):
    endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL.")
    region: str | None = Field(default=None, description="Object-store region.")
    secret_ref: LocalObjectRef | None = Field(
        default=None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )


class SearchOutput(_Spec):
    uri: str | None = Field(default=None, description="Where the best merged model is written.")


class MergeSearchSpec(_Spec):
    checkpoints: list[CheckpointRef] = Field(min_length=2, max_length=256)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    objective: ObjectiveSpec
    search: SearchSpec = Field(default_factory=SearchSpec, validate_default=True)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    storage: StorageSpec | None = None
    output: SearchOutput = Field(default_factory=SearchOutput)
    suspend: bool = Field(default=False, description="Pause the search; nothing is lost.")

    @field_validator("search")
    @classmethod
    def _confirm_has_unseen_examples(cls, search: SearchSpec, info: ValidationInfo) -> SearchSpec:
        """Without a limit a task's search uses every example: none would be left unseen."""
        objective = info.data.get("objective")
        if not search.confirm.enabled or objective is None:
            return search
        unlimited = [i for i, t in enumerate(objective.held_in) if t.limit is None]
        if unlimited:
            fields = ", ".join(f"objective.heldIn[{i}].limit" for i in unlimited[:3])
            if len(unlimited) > 3:
                fields += f" and {len(unlimited) - 3} more"
            raise ValueError(
                f"confirm: needs unseen examples of every held-in task; set {fields} "
                "(the search's subset), or confirm.enabled: false"
            )
        return search

    @field_validator("checkpoints")
    @classmethod
    def _unique_checkpoints(cls, checkpoints: list[CheckpointRef]) -> list[CheckpointRef]:
        names = [c.name for c in checkpoints]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"names must be unique: {twice}")
        return checkpoints

    @property
    def checkpoint_names(self) -> list[str]:
        return [c.name for c in self.checkpoints]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns1123(cls, name: str) -> str:
        # What the API server accepts, and in local mode a safe directory name
        # (.mergesearch/NAME): no "/", no "..", no leading dot.
        if not re.match(OBJECT_NAME_PATTERN, name):
            raise ValueError(
                f"{name!r} is not a valid name: lowercase letters, digits, '-' and '.', "
                "starting and ending with a letter or digit (a DNS-1123 subdomain, as Kubernetes "
                "requires)"
            )
        return name


class MergeSearch(BaseModel):
    """A whole manifest, as `kubectl apply` and `mergesearch run` read it."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    api_version: Literal["mergesearch.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["MergeSearch"]
    metadata: Metadata
    spec: MergeSearchSpec


class SpecError(ValueError):
    """Invalid manifest; `errors` lists one "field.path: problem" line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: invalid MergeSearch\n  " + "\n  ".join(errors))
        self.errors = errors


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must match {pattern}",
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-before"} or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, naming the field as a user writes it: `spec.search.sigma0`."""
    lines = []
    for err in exc.errors():
        template = _MESSAGES.get(err["type"])
        ctx = err.get("ctx") or {}
        message = template.format(**ctx) if template else err["msg"]
        message = message.removeprefix("Value error, ")
        field = _path(tuple(err["loc"]))
        where = f"{prefix}.{field}" if prefix and field else prefix or field
        lines.append(f"{where}: {message}" if where else message)
    return lines


def cluster_errors(spec: MergeSearchSpec) -> list[str]:
    """What a valid spec may not ask of a cluster (one "field: problem" line each): a local
    directory of custom tasks means nothing in a trial pod; a warm evaluator scores its
    resident model in-process, so it has no server backend (it would fail its first lease
    only after fetching every checkpoint: refused here, before any pod)."""
    errors = []
    custom = spec.objective.custom_tasks
    if custom is not None and custom.path is not None:
        errors.append(
            "spec.objective.customTasks.path: a local directory works in local mode only; "
            "on a cluster put the task files in a ConfigMap and use customTasks.configMapRef"
        )
    backend = spec.objective.evaluator.backend
    if spec.execution.mode == "warm" and backend != "hf":
        errors.append(
            f"spec.execution.mode: warm evaluators score in-process with backend hf; backend "
            f"{backend} (spec.objective.evaluator.backend) runs in trial Jobs: use mode: jobs"
        )
    return errors


def parse_manifest(data: Any, source: str = "manifest") -> MergeSearch:
    """Validate a loaded manifest; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(source, ["(document): must be a mapping with apiVersion, kind, spec"])
    try:
        return MergeSearch.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, format_errors(exc)) from None


def parse_spec(data: Any, source: str = "spec") -> MergeSearchSpec:
    """Validate just a `spec` mapping, as the operator receives it from the API server."""
    try:
        return MergeSearchSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, format_errors(exc, prefix="spec")) from None


def load_manifest(path: Path) -> MergeSearch:
    """Read a YAML manifest (safe loader: no tags, no objects)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"(document): not valid YAML: {exc}"]) from None
    return parse_manifest(data, str(path))

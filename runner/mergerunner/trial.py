"""The trial contract: what the operator (or local mode) hands the runner, and what it gets back.

This module is the only part of the runner that the operator imports, so it must stay pure
Python: pydantic and the standard library, never torch. Both documents carry an `apiVersion`
so that an operator and a runner image of different releases can tell whether they understand
each other; see docs/trial-contract.md for the versioning rules.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

TRIAL_API_VERSION = "mergerunner.mergesearch.io/v1"
RESULT_API_VERSION = "mergerunner.mergesearch.io/v1"

# Kubernetes truncates a termination message at 4096 bytes; stay under with a margin.
TERMINATION_MESSAGE_LIMIT = 4000

Dtype = Literal["bfloat16", "float16", "float32"]
Step = Literal["input", "fetch", "merge", "evaluate", "upload"]
# Which examples the held-in tasks are scored on: the search's seeded subset, or the disjoint
# confirmation subset that the search never saw (see mergerunner.evaluate.subset_indices).
Subset = Literal["search", "confirmation"]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")]


class _Model(BaseModel):
    """camelCase on the wire (as in Kubernetes manifests), snake_case in Python; extra keys are
    errors, because a misspelt option silently ignored is a search silently misconfigured."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class CheckpointRef(_Model):
    """A checkpoint by name (used as the weight's key) and location."""

    name: Name = Field(description="Unique name of the checkpoint within the search.")
    uri: str = Field(
        min_length=1,
        description="s3://, gs://, az://, file:// or a local path to an HF-format directory.",
    )


class TaskSpec(_Model):
    """One lm-evaluation-harness task and how to score it."""

    task: str = Field(min_length=1, description="lm-eval task name (registry or custom YAML).")
    metric: str = Field(
        default="acc",
        min_length=1,
        description='lm-eval metric key, optionally with its filter: "acc" or '
        '"exact_match,strict-match". Without a filter, the "none" filter is used.',
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="Examples to score (a fixed, seeded subset); all when unset.",
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, description="Few-shot examples; the task's default when unset."
    )
    weight: float = Field(default=1.0, gt=0, description="Weight in the held-in macro-average.")


class EvaluatorSpec(_Model):
    """How the runner evaluates a merged model."""

    backend: Literal["hf", "vllm", "analytic"] = Field(
        default="hf",
        description='lm-eval model backend. "analytic" is the benchmarking mode: no checkpoint is '
        "fetched or merged and no model is evaluated; the weights are scored by a fixed analytic "
        "function (docs/trial-contract.md). Never use it for a real search.",
    )
    batch_size: int | Literal["auto"] = Field(default="auto", description="Batch size or auto.")
    device: str = Field(default="auto", description='"auto" (CUDA when present), "cpu", "cuda:0".')
    seed: int = Field(default=1234, ge=0, description="Seed of example subsets and few-shot.")
    max_length: int | None = Field(default=None, ge=1, description="Context length override.")
    trust_remote_code: bool = Field(
        default=False, description="Let transformers run code shipped with the checkpoint."
    )


class OutputSpec(_Model):
    """Where the runner writes the merged model and full results, if anywhere."""

    uri: str | None = Field(default=None, description="Destination prefix (s3://… or a path).")
    save_model: bool = Field(default=False, description="Write the merged model to the URI.")


class TrialDocument(_Model):
    """Everything one trial needs, and nothing secret: credentials come from the pod's env."""

    api_version: Literal["mergerunner.mergesearch.io/v1"] = TRIAL_API_VERSION
    id: str = Field(min_length=1, max_length=253)
    checkpoints: list[CheckpointRef] = Field(min_length=1)
    weights: dict[str, float]
    dtype: Dtype = "bfloat16"
    held_in: list[TaskSpec] = Field(default_factory=list)
    held_out: list[TaskSpec] = Field(default_factory=list)
    custom_tasks_dir: str | None = Field(
        default=None, description="Directory of lm-eval task YAMLs to register."
    )
    evaluator: EvaluatorSpec = Field(default_factory=EvaluatorSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    subset: Subset | None = Field(
        default=None,
        description='Held-in examples to score: "search" (the default) or "confirmation", '
        "the seeded subset disjoint from the search's. Held-out tasks always use the search's.",
    )

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, w in weights.items() if not math.isfinite(w))
        if bad:
            raise ValueError(f"weights must be finite numbers; not finite: {', '.join(bad)}")
        return weights

    @model_validator(mode="after")
    def _consistent(self) -> TrialDocument:
        names = [c.name for c in self.checkpoints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"checkpoints: duplicate names: {', '.join(dupes)}")
        if set(self.weights) != set(names):
            missing = sorted(set(names) - set(self.weights))
            extra = sorted(set(self.weights) - set(names))
            raise ValueError(
                f"weights must name every checkpoint exactly once (missing: {missing or '-'}, "
                f"unknown: {extra or '-'})"
            )
        tasks = [t.task for t in (*self.held_in, *self.held_out)]
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:
            raise ValueError(f"tasks listed more than once (held-in and held-out): {twice}")
        if not tasks:
            raise ValueError("at least one task is needed in heldIn or heldOut")
        if self.output.save_model and not self.output.uri:
            raise ValueError("output.saveModel needs output.uri")
        return self

    def weight_vector(self) -> list[float]:
        """Weights in checkpoint order: the order the merge consumes them in."""
        return [self.weights[c.name] for c in self.checkpoints]


class StepTimings(_Model):
    fetch_s: float = 0.0
    merge_s: float = 0.0
    evaluate_s: float = 0.0
    upload_s: float = 0.0
    total_s: float = 0.0


class TrialResult(_Model):
    """What a trial reports. `fitness` is the weight-averaged held-in score, the number the
    search maximises; held-out scores are reported but never feed the search."""

    api_version: Literal["mergerunner.mergesearch.io/v1"] = RESULT_API_VERSION
    id: str
    status: Literal["succeeded", "failed"]
    failed_step: Step | None = None
    error: str | None = None
    held_in: dict[str, float] = Field(default_factory=dict)
    held_out: dict[str, float] = Field(default_factory=dict)
    fitness: float | None = None
    digest: str | None = None
    timings: StepTimings = Field(default_factory=StepTimings)
    output_uri: str | None = None
    truncated: bool = False

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))

    def termination_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """The result as it fits in a pod's termination message.

        Kubernetes keeps only the first 4096 bytes, and a cut JSON document is useless, so what
        does not fit is dropped in order of least use to the operator (timings, then the error's
        tail, then held-out scores), and `truncated` says so; the full result stays in the result
        file and on stdout.
        """
        text = self.to_json()
        if len(text.encode()) <= limit:
            return text
        slim = self.model_copy(update={"truncated": True, "timings": StepTimings()})
        if slim.error and len(slim.error) > 500:
            slim = slim.model_copy(update={"error": slim.error[:500] + "…"})
        text = slim.to_json()
        if len(text.encode()) <= limit:
            return text
        slim = slim.model_copy(update={"held_out": {}})
        text = slim.to_json()
        if len(text.encode()) <= limit:
            return text
        raise ValueError(
            f"trial result for {self.id!r} does not fit in {limit} bytes even without timings "
            "and held-out scores; too many held-in tasks for a termination message"
        )


def fitness_of(scores: dict[str, float], held_in: list[TaskSpec]) -> float:
    """Weighted mean of held-in scores: the paper's macro-average, with optional task weights."""
    total = sum(t.weight for t in held_in)
    return sum(t.weight * scores[t.task] for t in held_in) / total


def parse_trial(text: str) -> TrialDocument:
    """Parse a trial document from JSON text (never YAML tags, never pickle)."""
    return TrialDocument.model_validate(json.loads(text))

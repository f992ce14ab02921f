"""The trial contract: what the operator (or local mode) hands the runner, and what it gets back.

This module is the only part of the runner that the operator imports, so it must stay pure
Python: pydantic and the standard library, never torch. Both documents carry an `apiVersion`
so that an operator and a runner image of different releases can tell whether they understand
each other; see docs/trial-contract.md for the versioning rules.
"""

from __future__ import annotations

import base64
import json
import math
import random
import struct
import zlib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

TRIAL_API_VERSION = "mergerunner.mergesearch.io/v2"
RESULT_API_VERSION = "mergerunner.mergesearch.io/v2"

# Kubernetes truncates a termination message at 4096 bytes; stay under with a margin.
TERMINATION_MESSAGE_LIMIT = 4000
# The longest error text a termination message keeps, and the most a packed result may inflate
# to when it is read back (a guard against a compression bomb in a pod's message).
MESSAGE_ERROR_CHARS = 500
# The longest error text a rejected trial document's result keeps (in the result file).
INPUT_ERROR_CHARS = 2000
MAX_PACKED_BYTES = 1 << 20

Dtype = Literal["bfloat16", "float16", "float32"]
Step = Literal["input", "preflight", "fetch", "merge", "evaluate", "upload"]
# Which examples the held-in tasks are scored on: the search's seeded subset, or the disjoint
# confirmation subset that the search never saw (see mergerunner.evaluate.subset_indices).
Subset = Literal["search", "confirmation"]
Text = Annotated[str, StringConstraints(min_length=1)]  # a string that may not be empty
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")]
GenValue = str | int | float | bool | list[str]


class FailureKind(StrEnum):
    """Why a trial failed, as a kind: what the operator and local mode decide from.

    The runner sets it from the type of the exception that stopped a step (never from message
    text), so a reworded message cannot turn a fatal configuration error into a retried one.
    `FAILURE_POLICY` says what each kind means for the search.
    """

    INVALID_INPUT = "invalid-input"  # the trial document itself was refused
    CHECKPOINT_UNAVAILABLE = "checkpoint-unavailable"  # not found, access denied
    CHECKPOINT_INVALID = "checkpoint-invalid"  # unreadable or malformed files, non-finite inputs
    CHECKPOINTS_INCOMPATIBLE = "checkpoints-incompatible"  # tensor names or shapes disagree
    UNKNOWN_TASK = "unknown-task"
    UNKNOWN_METRIC = "unknown-metric"
    DATA_MISSING = "data-missing"  # a task's data (or metric code, NLTK data) is not available
    CONFIG = "config"  # any other configuration the trial cannot run with (backend, options)
    OUT_OF_MEMORY = "out-of-memory"  # the model does not fit where the trial runs
    NON_FINITE = "non-finite"  # these weights produce a NaN/Inf model (e.g. float16 overflow)
    STORAGE_UNAVAILABLE = "storage-unavailable"  # the object store could not be reached
    SERVER_FAILED = "server-failed"  # the inference server did not start or died
    TIMEOUT = "timeout"
    INTERNAL = "internal"  # anything unexpected; counted against the failure budget


class FailurePolicy(StrEnum):
    """What a failure of a kind does to the search."""

    FATAL = "fatal"  # every later trial would fail the same way: fail the search at once
    RETRY = "retry"  # an outage: re-run the trial after a backoff, not counted as a failure
    COUNTED = "counted"  # this trial failed; counts against maxFailedTrials


FAILURE_POLICY: dict[FailureKind, FailurePolicy] = {
    FailureKind.INVALID_INPUT: FailurePolicy.FATAL,
    FailureKind.CHECKPOINT_UNAVAILABLE: FailurePolicy.FATAL,
    FailureKind.CHECKPOINT_INVALID: FailurePolicy.FATAL,
    FailureKind.CHECKPOINTS_INCOMPATIBLE: FailurePolicy.FATAL,
    FailureKind.UNKNOWN_TASK: FailurePolicy.FATAL,
    FailureKind.UNKNOWN_METRIC: FailurePolicy.FATAL,
    FailureKind.DATA_MISSING: FailurePolicy.FATAL,
    FailureKind.CONFIG: FailurePolicy.FATAL,
    FailureKind.OUT_OF_MEMORY: FailurePolicy.FATAL,
    FailureKind.NON_FINITE: FailurePolicy.COUNTED,
    FailureKind.STORAGE_UNAVAILABLE: FailurePolicy.RETRY,
    FailureKind.SERVER_FAILED: FailurePolicy.COUNTED,
    FailureKind.TIMEOUT: FailurePolicy.COUNTED,
    FailureKind.INTERNAL: FailurePolicy.COUNTED,
}


# Trials that failed for a transient reason (FailurePolicy.RETRY: the object store could not be
# reached) run again after a backoff and are not told to the search: RETRY_BASE_S doubling up
# to RETRY_CAP_S, at most RETRY_LIMIT times per trial (15 s … 300 s: ~35 min in all), after
# which the failure counts like any other. The finalization (held-out scores and export of the
# chosen merge) that fails for a counted reason (a crash, a timeout) runs FINALIZATION_ATTEMPTS
# times in all. The operator and local mode follow the same schedule.
RETRY_BASE_S = 15.0
RETRY_CAP_S = 300.0
RETRY_LIMIT = 10
FINALIZATION_ATTEMPTS = 3


def failure_policy(kind: FailureKind | None, *, first_trials: bool = False) -> FailurePolicy:
    """What a failed trial does to the search, for the operator and local mode alike: its
    kind's `FAILURE_POLICY`; a failure without a kind counts. Storage that was never reached
    at all (`first_trials`: no trial has succeeded yet) is a misconfigured endpoint, not an
    outage: fatal."""
    if kind is None:
        return FailurePolicy.COUNTED
    if kind is FailureKind.STORAGE_UNAVAILABLE and first_trials:
        return FailurePolicy.FATAL
    return FAILURE_POLICY[kind]


def runs_again(
    kind: FailureKind | None,
    attempt: int,
    *,
    first_trials: bool = False,
    finalization: bool = False,
) -> bool:
    """Whether a trial whose run number `attempt` (1, 2, …) failed with `kind` runs again: an
    outage up to RETRY_LIMIT times; the final evaluation also after a counted failure, up to
    FINALIZATION_ATTEMPTS runs in all."""
    policy = failure_policy(kind, first_trials=first_trials)
    if policy is FailurePolicy.RETRY:
        return attempt <= RETRY_LIMIT
    return finalization and policy is FailurePolicy.COUNTED and attempt < FINALIZATION_ATTEMPTS


def backoff_s(attempt: int) -> float:
    """The wait before retry number `attempt` (1, 2, …)."""
    return min(RETRY_BASE_S * 2 ** max(attempt - 1, 0), RETRY_CAP_S)


class TrialError(Exception):
    """An error that knows its failure kind. Runner errors subclass it or carry a
    `failure_kind` attribute, so the step that catches them reports the kind without reading
    the message."""

    failure_kind: FailureKind = FailureKind.INTERNAL

    def __init__(self, message: str, *, kind: FailureKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.failure_kind = kind


def failure_kind_of(exc: BaseException) -> FailureKind:
    """The kind an exception carries (its `failure_kind`), else by its type: MemoryError and
    torch's OutOfMemoryError are `out-of-memory`, TimeoutError `timeout`, anything else
    `internal`."""
    kind = getattr(exc, "failure_kind", None)
    if isinstance(kind, FailureKind):
        return kind
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return FailureKind.OUT_OF_MEMORY
    if isinstance(exc, TimeoutError):
        return FailureKind.TIMEOUT
    return FailureKind.INTERNAL


class _Model(BaseModel):
    """camelCase on the wire (as in Kubernetes manifests), snake_case in Python; extra keys are
    errors, because a misspelt option silently ignored is a search silently misconfigured."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class _Document(_Model):
    """A part of the trial document: strict types, as the Python API has them. A weight of
    "0.5" or `true`, a limit of 2.5: refused, never coerced (JSON integers stay valid where a
    number is expected)."""

    model_config = ConfigDict(strict=True)


class CheckpointRef(_Document):
    """A checkpoint by name (used as the weight's key) and location."""

    name: Name = Field(description="Unique name of the checkpoint within the search.")
    uri: Text = Field(
        description="s3://, gs://, az://, file:// or a local path to an HF-format directory.",
    )


class TaskSpec(_Document):
    """One lm-evaluation-harness task and how to score it."""

    task: Text = Field(description="lm-eval task name (registry or custom YAML).")
    metric: Text = Field(
        default="acc",
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


# What lm-eval's device option accepts and the runner can place a model on.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
SERVER_BACKENDS = ("vllm", "openai")


class ServerSpec(_Document):
    """An OpenAI-compatible inference server the runner starts on the merged model.

    `vllm`: the command line is built by the runner (`mergerunner.server.vllm_command`: tensor
    parallelism over the pod's GPUs, the served path, maxModelLen); `extraArgs` are appended.
    `openai`: `command` is the user's server (SGLang, TGI, ...); in its words `{model}`,
    `{port}`, `{host}` and `{gpus}` are replaced by the merged model's directory, the port,
    127.0.0.1 and the number of GPUs.
    """

    command: list[str] | None = Field(
        default=None, min_length=1, description="Server command (backend openai only)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Arguments appended to the vLLM command line."
    )
    port: int = Field(default=8000, ge=1024, le=65535, description="Port on 127.0.0.1.")
    ready_timeout_seconds: int = Field(
        default=1800, ge=1, description="How long the server may take to answer /v1/models."
    )
    prompt_logprobs: bool | None = Field(
        default=None,
        description="Whether the server returns log-probabilities of prompt tokens (echo), "
        "which loglikelihood and multiple-choice tasks need. Default: true for vllm, false for "
        "openai; such tasks are refused before any trial when false.",
    )
    concurrency: int | None = Field(
        default=None, ge=1, description="Requests in flight; default 16 per GPU (1 on a CPU)."
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="vLLM --max-model-len; default evaluator.maxLength."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization."
    )


class EvaluatorSpec(_Document):
    """How the runner evaluates a merged model."""

    backend: Literal["hf", "vllm", "openai"] = Field(
        default="hf",
        description='"hf": transformers in-process through lm-eval, the model placed over every '
        'GPU of the pod; "vllm" or "openai": an inference server started on the merged model '
        "(see server).",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto", description='Batch size (at least 1) or "auto".'
    )
    device: str = Field(
        default="auto",
        pattern=DEVICE_PATTERN,
        description='"auto" (every GPU when present, else the CPU), "cpu", "cuda" or "cuda:N".',
    )
    seed: int = Field(default=1234, ge=0, description="Seed of example subsets and few-shot.")
    max_length: int | None = Field(default=None, ge=1, description="Context length override.")
    trust_remote_code: bool = Field(
        default=False, description="Let transformers run code shipped with the checkpoint."
    )
    cpu_offload: bool = Field(
        default=False,
        description="hf backend: put in host memory what the GPUs cannot hold (slow). When "
        "false, a model that does not fit fails before loading, naming the shortfall.",
    )
    server: ServerSpec | None = Field(
        default=None, description="The inference server (backends vllm and openai)."
    )

    @model_validator(mode="after")
    def _server_fits_backend(self) -> EvaluatorSpec:
        if self.backend in SERVER_BACKENDS:
            server = self.server or ServerSpec()
            if self.backend == "openai" and not server.command:
                raise ValueError("evaluator.server.command is required with backend openai")
            if self.backend == "vllm" and server.command:
                raise ValueError(
                    "evaluator.server.command is built by the runner with backend vllm; "
                    "use evaluator.server.extraArgs"
                )
        elif self.server is not None:
            raise ValueError("evaluator.server applies only to backends vllm and openai")
        if self.cpu_offload and self.backend != "hf":
            raise ValueError("evaluator.cpuOffload applies only to backend hf")
        return self

    @property
    def server_settings(self) -> ServerSpec:
        """The server's settings, defaults filled in (vllm: prompt log-probabilities on)."""
        server = self.server or ServerSpec()
        if server.prompt_logprobs is None:
            server = server.model_copy(update={"prompt_logprobs": self.backend == "vllm"})
        return server

    apply_chat_template: bool | str = Field(
        default=False,
        description="Format prompts with the tokenizer's chat template (true), or the named one "
        "of several (lm-eval's --apply_chat_template). For instruct checkpoints.",
    )
    system_instruction: Text | None = Field(
        default=None,
        description="System message put before every prompt (lm-eval's --system_instruction).",
    )
    fewshot_as_multiturn: bool | None = Field(
        default=None,
        description="Few-shot examples as alternating user/assistant turns; needs "
        "applyChatTemplate. Unset: true with a chat template, else false (as lm-eval's CLI).",
    )
    gen_kwargs: dict[str, GenValue] | None = Field(
        default=None,
        description="Generation settings that update every generative task's own "
        "(lm-eval's --gen_kwargs), e.g. {max_gen_toks: 512, temperature: 0}.",
    )

    @model_validator(mode="after")
    def _instruct(self) -> EvaluatorSpec:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshotAsMultiturn: true needs applyChatTemplate")
        if self.apply_chat_template == "":
            raise ValueError("applyChatTemplate: give true, false or a template name")
        return self

    @property
    def multiturn(self) -> bool:
        """fewshotAsMultiturn as lm-eval's CLI resolves it: on with a chat template."""
        if self.fewshot_as_multiturn is None:
            return bool(self.apply_chat_template)
        return self.fewshot_as_multiturn

    def prompt_settings(self) -> dict[str, Any]:
        """The instruct settings as recorded in a result (what shaped the prompts)."""
        return {
            "applyChatTemplate": self.apply_chat_template,
            "systemInstruction": self.system_instruction,
            "fewshotAsMultiturn": self.multiturn,
            "genKwargs": dict(self.gen_kwargs or {}),
        }


ANALYTIC_BACKEND = "analytic"


class TrialEvaluatorSpec(EvaluatorSpec):
    """The evaluator as a trial document carries it: a search's `objective.evaluator`, or the
    benchmarking objective `analytic` (`mergerunner.analytic`).

    `analytic` fetches, merges and evaluates nothing and scores the weights with a fixed
    function, so that benchmarks of the operator and its recovery tests run trials in a blink.
    It is no value of a MergeSearch's spec (nor of its CRD): only an operator started for
    benchmarks (`MERGESEARCH_BENCHMARK_OBJECTIVE=analytic`, docs/trial-contract.md) or a
    benchmark writing trial documents itself asks for it, so no real search can run on it.
    """

    backend: Literal["hf", "vllm", "openai", "analytic"] = Field(  # type: ignore[assignment]
        default="hf",
        description='As a search\'s evaluator.backend, or "analytic": the benchmarking '
        "objective (no checkpoint fetched or merged, no model evaluated).",
    )

    @classmethod
    def of(cls, evaluator: EvaluatorSpec) -> TrialEvaluatorSpec:
        """A search's evaluator as its trial documents carry it: the same settings, hence the
        same canonical JSON."""
        return cls.model_validate(evaluator.model_dump())

    @classmethod
    def analytic(cls) -> TrialEvaluatorSpec:
        return cls(backend=ANALYTIC_BACKEND)


class OutputSpec(_Document):
    """Where the runner writes the merged model and full results, if anywhere."""

    uri: str | None = Field(default=None, description="Destination prefix (s3://… or a path).")
    save_model: bool = Field(default=False, description="Write the merged model to the URI.")


class TrialDocument(_Document):
    """Everything one trial needs, and nothing secret: credentials come from the pod's env."""

    api_version: Literal["mergerunner.mergesearch.io/v2"] = TRIAL_API_VERSION
    id: str = Field(min_length=1, max_length=253)
    checkpoints: list[CheckpointRef] = Field(min_length=1)
    weights: dict[str, float]
    dtype: Dtype = "bfloat16"
    held_in: list[TaskSpec] = Field(default_factory=list)
    held_out: list[TaskSpec] = Field(default_factory=list)
    custom_tasks_dir: str | None = Field(
        default=None, description="Directory of lm-eval task YAMLs to register."
    )
    datasets_uri: Text | None = Field(
        default=None,
        description="Data bundle (mergesearch datasets pack) holding the registry tasks' data.",
    )
    allow_code_execution: bool = Field(
        default=False, description="Let code tasks (mbpp, humaneval) run generated programs."
    )
    evaluator: TrialEvaluatorSpec = Field(default_factory=TrialEvaluatorSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    subset: Subset | None = Field(
        default=None,
        description='Held-in examples to score: "search" (the default) or "confirmation", '
        "the seeded subset disjoint from the search's. Held-out tasks always use the search's.",
    )

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, w in weights.items() if not finite_in_float32(w))
        if bad:
            raise ValueError(
                "weights must be finite numbers, also in float32 (|w| < 3.4e38), the precision "
                f"the merge multiplies in; not finite: {', '.join(bad)}"
            )
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
        needed = worst_case_message_bytes(self)
        if needed > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(
                f"the result of this trial may need {needed} bytes in its termination message "
                f"(limit {TERMINATION_MESSAGE_LIMIT}) even packed: "
                f"{len(self.held_in) + len(self.held_out)} tasks, their names, the id and "
                "output.uri are too long; use fewer or shorter task names (or an lm-eval "
                "group, scored as one task)"
            )
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

    api_version: Literal["mergerunner.mergesearch.io/v2"] = RESULT_API_VERSION
    id: str
    status: Literal["succeeded", "failed"]
    failed_step: Step | None = None
    error_kind: FailureKind | None = Field(
        default=None, description="Why it failed, as a kind (docs/trial-contract.md)."
    )
    error: str | None = None
    held_in: dict[str, float] = Field(default_factory=dict)
    held_out: dict[str, float] = Field(default_factory=dict)
    subtasks: dict[str, float] | None = Field(
        default=None,
        description="Scores of the members of group tasks (result file only, never in the "
        "termination message).",
    )
    prompt: dict[str, Any] | None = Field(
        default=None, description="The instruct settings the prompts were built with."
    )
    fitness: float | None = None
    digest: str | None = None
    timings: StepTimings = Field(default_factory=StepTimings)
    output_uri: str | None = None
    truncated: bool = False

    @classmethod
    def scored(
        cls,
        trial_id: str,
        scores: Mapping[str, float],
        *,
        held_in: Sequence[TaskSpec],
        held_out: Sequence[TaskSpec] = (),
        **details: Any,
    ) -> TrialResult:
        """A succeeded trial: the scores of its held-in and held-out tasks, and its fitness
        (`fitness_of` the held-in scores; none without held-in tasks). `details` are the other
        fields (digest, timings, prompt, ...)."""
        inside = {t.task: scores[t.task] for t in held_in}
        return cls(
            id=trial_id,
            status="succeeded",
            held_in=inside,
            held_out={t.task: scores[t.task] for t in held_out},
            fitness=fitness_of(inside, held_in_weights(held_in)) if held_in else None,
            **details,
        )

    @classmethod
    def failed(
        cls,
        trial_id: str,
        step: Step | None,
        kind: FailureKind | None,
        error: str,
        **details: Any,
    ) -> TrialResult:
        """A failed trial: the step that failed, why as a kind, and the error's text. Step
        and kind are None only where no runner said (a pod killed before it could write a
        result: the operator then knows what Kubernetes reports, and no more)."""
        return cls(
            id=trial_id,
            status="failed",
            failed_step=step,
            error_kind=kind,
            error=error,
            **details,
        )

    @classmethod
    def rejected(cls, error: str, trial_id: str = "?") -> TrialResult:
        """A trial document that could not be read or was refused: a bad input, no step ran."""
        return cls.failed(trial_id, "input", FailureKind.INVALID_INPUT, error[:INPUT_ERROR_CHARS])

    @property
    def summary(self) -> str:
        """How it ended, for a log line, an event or a condition: "succeeded", or the failed
        step and the error ("merge: tensor model.norm.weight is NaN")."""
        if self.status == "succeeded":
            return "succeeded"
        step = f"{self.failed_step}: " if self.failed_step else ""
        return f"{step}{self.error or 'failed'}"

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))

    def termination_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """The result as it fits in a pod's termination message; never fails.

        Kubernetes keeps only the first 4096 bytes, and a cut JSON document is useless. So what
        does not fit is dropped in order of least use to the operator: timings and the error's
        tail first; then the result is *packed* (its JSON, zlib-compressed, base64, in the
        `packed` field: task names compress well, so about 200 held-in scores fit, see
        `unpack_result`); then held-out scores go; last, every score goes (the compact form).
        `truncated` says that something was dropped; the full result stays on stdout and in
        the result file. The trial document's validation (`worst_case_message_bytes`) makes
        sure the held-in and held-out scores always fit, packed.
        """
        slim = self.model_copy(update={"subtasks": None})  # the result file keeps them
        text = slim.to_json()
        if len(text.encode()) <= limit:
            return text
        slim = slim.model_copy(update={"truncated": True, "timings": StepTimings()})
        if slim.error and len(slim.error) > MESSAGE_ERROR_CHARS:
            slim = slim.model_copy(update={"error": slim.error[:MESSAGE_ERROR_CHARS] + "…"})
        candidates = (
            slim.to_json(),
            slim.packed(),
            slim.model_copy(update={"held_out": {}}).packed(),
            slim.model_copy(update={"held_out": {}, "held_in": {}}).to_json(),
        )
        for text in candidates:
            if len(text.encode()) <= limit:
                return text
        return self.compact().to_json()

    def packed(self) -> str:
        """This result as `{apiVersion, id, status, truncated, packed}`, where `packed` is the
        base64 of the zlib-compressed JSON of the whole result."""
        body = base64.b64encode(zlib.compress(self.to_json().encode(), 9)).decode("ascii")
        envelope = {
            "apiVersion": self.api_version,
            "id": self.id,
            "status": self.status,
            "truncated": True,
            "packed": body,
        }
        return json.dumps(envelope, sort_keys=True, separators=(",", ":"))

    def compact(self) -> TrialResult:
        """The smallest form: what happened and why, without scores, timings or a long id."""
        return TrialResult(
            id=self.id[:253],
            status=self.status,
            failed_step=self.failed_step,
            error_kind=self.error_kind,
            error=(self.error or "")[:MESSAGE_ERROR_CHARS] or None,
            fitness=self.fitness,
            digest=self.digest,
            truncated=True,
        )


def unpack_result(data: dict) -> dict:
    """A result document as read from a termination message, with a `packed` result (see
    `TrialResult.termination_message`) expanded; any other document is returned unchanged.
    Only JSON is decoded, and at most MAX_PACKED_BYTES of it."""
    packed = data.get("packed")
    if not isinstance(packed, str):
        return data
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(base64.b64decode(packed, validate=True), MAX_PACKED_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"packed result inflates beyond {MAX_PACKED_BYTES} bytes")
        full = json.loads(text)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"packed result cannot be read: {exc}") from exc
    if not isinstance(full, dict):
        raise ValueError("packed result is not a JSON object")
    return {**full, "truncated": True}


def parse_result_message(text: str) -> TrialResult:
    """A `TrialResult` from a termination message, packed or not."""
    return TrialResult.model_validate(unpack_result(json.loads(text)))


def packed_result_bytes(
    tasks: Sequence[str], *, trial_id: str = "x" * 253, output_uri: str | None = None
) -> int:
    """The size of the packed termination message of a successful trial scoring `tasks`, at
    its largest: a score of the longest form (24 characters of digits that do not compress)
    for every task, a digest, the id and the output URI."""
    rng = random.Random(0)

    def score() -> float:
        return float(f"-{rng.randint(1, 9)}.{rng.randrange(10**16):016d}e-{rng.randint(100, 307)}")

    worst = TrialResult(
        id=trial_id,
        status="succeeded",
        held_in={task: score() for task in tasks},
        fitness=score(),
        digest="blake3:" + "f" * 64,
        output_uri=output_uri,
        truncated=True,
    )
    return len(worst.packed().encode())


def worst_case_message_bytes(doc: TrialDocument) -> int:
    """`packed_result_bytes` of this trial: every held-in and held-out score must reach the
    operator (held-out scores are what a final trial is for)."""
    tasks = [t.task for t in (*doc.held_in, *doc.held_out)]
    return packed_result_bytes(tasks, trial_id=doc.id, output_uri=doc.output.uri)


def finite_in_float32(value: float) -> bool:
    """Whether `value` stays finite when rounded to float32, as the merge rounds a weight."""
    if not math.isfinite(value):
        return False
    try:
        struct.pack("<f", value)
    except OverflowError:
        return False
    return True


def fitness_of(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The number a search maximises: the weighted mean of the held-in scores (the paper's
    macro-average, with optional task weights, `weights` by task name).

    The one definition, for the runner's result, the engine and local mode alike. `math.fsum`
    rounds each sum exactly once, so the figure does not depend on the order of the tasks (a
    plain `sum` of 3 scores can differ in the last bit between two orders).
    """
    total = math.fsum(weight * scores[task] for task, weight in weights.items())
    return total / math.fsum(weights.values())


def held_in_weights(tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """The held-in tasks' weights by name, as `fitness_of` takes them."""
    return {t.task: t.weight for t in tasks}


def parse_trial(text: str) -> TrialDocument:
    """Parse a trial document from JSON text (never YAML tags, never pickle).

    Any unreadable document is a ValueError (or pydantic's ValidationError, also one), so the
    runner reports it as bad input: JSON nested deeper than the parser's recursion limit too.
    """
    try:
        return TrialDocument.model_validate(json.loads(text))
    except RecursionError:
        raise ValueError("the trial document is nested too deeply to be read") from None

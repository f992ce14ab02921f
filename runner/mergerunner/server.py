"""Scoring through an OpenAI-compatible inference server started on the merged model.

On generation-heavy tasks (gsm8k, mbpp, ifeval) an inference engine such as vLLM is commonly
5–20x faster than transformers' `generate`. The runner writes the merged model to disk (it does
so anyway: the file is what is exported and digested), starts the server on that directory,
waits until `/v1/models` answers, scores through lm-eval's `local-completions` and stops the
server. The server's output goes to the trial log (the runner's stderr), and its failures are
`FailureKind.SERVER_FAILED`.

Everything but the process is pure: the vLLM command line (`vllm_command`), a user's command
with its placeholders (`user_command`), the concurrency, and the check that refuses
loglikelihood tasks on a server that cannot return prompt log-probabilities
(`check_server_tasks`). The protocol path is tested end to end against `transformers serve`,
which runs on a CPU; vLLM differs from it only by the command line, built here.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mergerunner.trial import EvaluatorSpec, FailureKind, ServerSpec, TrialError

HOST = "127.0.0.1"
SERVED_NAME = "merged"
# Tasks that need log-probabilities of given text, which a completions server returns only
# when it can echo the prompt with its token log-probabilities.
LOGPROB_OUTPUT_TYPES = frozenset({"loglikelihood", "loglikelihood_rolling", "multiple_choice"})
# Requests in flight per GPU: vLLM batches whatever is in flight, and lm-eval's examples are
# short, so a few dozen keep a GPU busy; a CPU server serves one at a time.
CONCURRENCY_PER_GPU = 16
LOG_TAIL_LINES = 40


class ServerError(TrialError):
    """The server did not start, died, or cannot serve the tasks; the kind says which."""

    failure_kind = FailureKind.SERVER_FAILED


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def vllm_command(
    model_dir: Path,
    *,
    port: int,
    gpus: int,
    dtype: str,
    seed: int,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server's command line for a merged model on `gpus` GPUs of one pod.

    Tensor parallelism over every GPU (a 70B model in bf16 needs 2 × 80 GB at least; 8-way TP
    keeps the KV cache large), the directory served under a fixed name, remote code off.
    """
    command = [
        *("vllm", "serve", str(model_dir)),
        *("--host", HOST, "--port", str(port)),
        *("--served-model-name", SERVED_NAME),
        *("--tensor-parallel-size", str(max(1, gpus))),
        *("--dtype", dtype),
        *("--seed", str(seed)),
        *("--gpu-memory-utilization", str(gpu_memory_utilization)),
        # One access-log line per request would drown the trial log (lm-eval sends thousands);
        # request logging itself is off by default since vLLM 0.11, which removed
        # --disable-log-requests.
        "--disable-uvicorn-access-log",
    ]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    return [*command, *extra_args]


def user_command(template: Sequence[str], model_dir: Path, *, port: int, gpus: int) -> list[str]:
    """A user's server command with `{model}`, `{port}`, `{host}`, `{gpus}` filled in.

    Only these names are replaced (str.replace, not str.format), so other braces in an
    argument (a JSON option) pass through untouched.
    """
    values = {"{model}": str(model_dir), "{port}": str(port), "{host}": HOST, "{gpus}": str(gpus)}
    out = []
    for word in template:
        for key, value in values.items():
            word = word.replace(key, value)
        out.append(word)
    return out


def server_command(spec: EvaluatorSpec, model_dir: Path, *, gpus: int, dtype: str) -> list[str]:
    """The command that serves `model_dir` for this evaluator (backend vllm or openai)."""
    server = spec.server_settings
    if spec.backend == "vllm":
        return vllm_command(
            model_dir,
            port=server.port,
            gpus=gpus,
            dtype=dtype,
            seed=spec.seed,
            max_model_len=server.max_model_len or spec.max_length,
            gpu_memory_utilization=server.gpu_memory_utilization,
            extra_args=server.extra_args,
        )
    if server.command is None:  # the schema requires it; kept for type checkers
        raise ServerError("evaluator.server.command is required with backend openai")
    return user_command(server.command, model_dir, port=server.port, gpus=gpus)


def served_model_name(spec: EvaluatorSpec, model_dir: Path) -> str:
    """The model name requests carry: vLLM's fixed served name; for a user's server the model
    directory, which is how servers started on a path (SGLang, transformers serve) name it."""
    return SERVED_NAME if spec.backend == "vllm" else str(model_dir)


def concurrency(server: ServerSpec, gpus: int) -> int:
    """Requests in flight: as set, else CONCURRENCY_PER_GPU per GPU, 1 without a GPU."""
    if server.concurrency is not None:
        return server.concurrency
    return CONCURRENCY_PER_GPU * gpus if gpus else 1


def check_server_tasks(output_types: Mapping[str, str], spec: EvaluatorSpec) -> None:
    """Refuse tasks the server cannot score, before any model is merged or served.

    Loglikelihood and multiple-choice tasks need the log-probabilities of the prompt's tokens
    (`echo` with `logprobs`); vLLM returns them, many servers (transformers serve among them)
    do not, and lm-eval would fail only mid-scoring.
    """
    if spec.backend not in ("vllm", "openai") or spec.server_settings.prompt_logprobs:
        return
    needing = sorted(t for t, kind in output_types.items() if kind in LOGPROB_OUTPUT_TYPES)
    if needing:
        raise ServerError(
            f"task(s) {', '.join(needing)} need prompt log-probabilities, which "
            f"evaluator.server.promptLogprobs says this {spec.backend} server cannot return; "
            "score them with backend hf or vllm, or set promptLogprobs if the server can",
            kind=FailureKind.CONFIG,
        )


# ---------------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """A server started in its own process group, its output copied to our stderr."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        try:
            self.process = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise ServerError(f"cannot start server {self.command[0]!r}: {exc}") from exc
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            sys.stderr.write(f"[server] {line}")

    def last_lines(self) -> str:
        return "\n".join(list(self.tail)[-10:])

    def wait_ready(self, base: str, timeout_s: float, *, poll_s: float = 0.5) -> float:
        """Poll `{base}/v1/models` until it answers 200; returns the seconds it took."""
        start = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"server exited with code {code} before it was ready; its last lines:\n"
                    f"{self.last_lines()}"
                )
            if _get_ok(f"{base}/v1/models"):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise ServerError(
                    f"server did not answer {base}/v1/models within {timeout_s:.0f} s "
                    f"(evaluator.server.readyTimeoutSeconds); its last lines:\n{self.last_lines()}"
                )
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the whole group (vLLM's workers too), SIGKILL after `grace_s`."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._pump.join(timeout=5)


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own 127.0.0.1)
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def returns_prompt_logprobs(base: str, model: str) -> bool:
    """Ask the server for the log-probabilities of a prompt; True when it gives them."""
    body = {"model": model, "prompt": "a b", "max_tokens": 1, "temperature": 0}
    body |= {"echo": True, "logprobs": 1}
    request = urllib.request.Request(  # noqa: S310 (our own 127.0.0.1)
        f"{base}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    choices = answer.get("choices") or [{}]
    logprobs = choices[0].get("logprobs") or {}
    return bool(logprobs.get("token_logprobs"))


@contextmanager
def serving(
    spec: EvaluatorSpec,
    model_dir: Path,
    *,
    gpus: int,
    dtype: str,
    needs_logprobs: bool,
) -> Iterator[str]:
    """Start the server on `model_dir`, yield its base URL once ready, stop it afterwards."""
    server = spec.server_settings
    base = f"http://{HOST}:{server.port}"
    process = ServerProcess(server_command(spec, model_dir, gpus=gpus, dtype=dtype))
    try:
        seconds = process.wait_ready(base, server.ready_timeout_seconds)
        print(f"[server] ready after {seconds:.1f} s", file=sys.stderr)
        if needs_logprobs and not returns_prompt_logprobs(base, served_model_name(spec, model_dir)):
            raise ServerError(
                "the server returned no prompt log-probabilities (echo with logprobs), which "
                "the loglikelihood and multiple-choice tasks need; set "
                "evaluator.server.promptLogprobs to false to refuse such tasks before any trial",
                kind=FailureKind.CONFIG,
            )
        try:
            yield base
        except ServerError:
            raise
        except Exception as exc:
            code = process.process.poll()
            if code is None:
                raise
            # lm-eval reports a connection error after its retries; the cause is the server.
            raise ServerError(
                f"server exited with code {code} while scoring; its last lines:\n"
                f"{process.last_lines()}"
            ) from exc
    finally:
        process.stop()


# ---------------------------------------------------------------------------------------------
# lm-eval's side
# ---------------------------------------------------------------------------------------------


def make_server_lm(spec: EvaluatorSpec, base: str, model_dir: Path, *, gpus: int) -> Any:
    """lm-eval's `local-completions`, set up to see what the hf backend sees.

    A server that returns prompt log-probabilities (vLLM) gets token ids, encoded by the merged
    model's own tokenizer with its default special tokens, as lm-eval's hf backend encodes them:
    the same tokens are scored, and a loglikelihood's context length is exact. Other servers
    get text (some, transformers serve among them, accept nothing else), which they tokenise
    with the same defaults. Generations are cut at the task's stop sequences as the hf backend
    cuts them (servers differ on whether the stop string is part of the text).
    """
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from mergerunner.evaluate import _quiet  # progress bars off, as in local mode

    server = spec.server_settings
    kwargs: dict[str, Any] = {
        "model": served_model_name(spec, model_dir),
        "base_url": f"{base}/v1/completions",
        "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": bool(server.prompt_logprobs),
        "add_bos_token": True,  # i.e. the tokenizer's default special tokens, as hf's
        "num_concurrent": concurrency(server, gpus),
        "max_retries": 3,
        "seed": spec.seed,
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.max_length is not None:
        kwargs["max_length"] = spec.max_length
    return _quiet(_completions_class(LocalCompletionsAPI))(**kwargs)


def _completions_class(base: type) -> type:
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    class ServerCompletions(base):  # type: ignore[misc, valid-type]
        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
            texts = super().generate_until(requests, disable_tqdm=disable_tqdm)
            eos = self.tokenizer.decode([self.eot_token_id]) if self.tokenizer else None
            return [
                postprocess_generated_text(
                    text, handle_stop_sequences(request.args[1].get("until"), eos), None
                )
                for text, request in zip(texts, requests, strict=True)
            ]

    return ServerCompletions

"""The server backends' pure parts: command lines, placeholders, concurrency, task checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mergerunner.server import (
    SERVED_NAME,
    ServerError,
    check_server_tasks,
    concurrency,
    served_model_name,
    server_command,
    user_command,
    vllm_command,
)
from mergerunner.trial import EvaluatorSpec, FailureKind, ServerSpec

pytestmark = pytest.mark.unit

MODEL = Path("/work/merged")


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_vllm_uses_every_gpu_of_the_pod_by_tensor_parallelism():
    command = vllm_command(MODEL, port=8123, gpus=8, dtype="bfloat16", seed=7)
    assert command[:3] == ["vllm", "serve", str(MODEL)]
    assert _option(command, "--tensor-parallel-size") == "8"
    assert _option(command, "--served-model-name") == SERVED_NAME
    assert _option(command, "--port") == "8123"
    assert _option(command, "--host") == "127.0.0.1"
    assert _option(command, "--dtype") == "bfloat16"
    assert _option(command, "--seed") == "7"
    assert "--max-model-len" not in command
    assert "--trust-remote-code" not in command
    assert "--disable-uvicorn-access-log" in command


def test_vllm_command_from_the_evaluator_spec():
    spec = EvaluatorSpec(
        backend="vllm",
        max_length=4096,
        seed=3,
        server=ServerSpec(port=9000, gpu_memory_utilization=0.8, extra_args=["--enforce-eager"]),
    )
    command = server_command(spec, MODEL, gpus=1, dtype="float16")
    assert _option(command, "--max-model-len") == "4096"
    assert _option(command, "--gpu-memory-utilization") == "0.8"
    assert _option(command, "--tensor-parallel-size") == "1"
    assert _option(command, "--port") == "9000"
    assert command[-1] == "--enforce-eager"
    explicit = spec.model_copy(update={"server": ServerSpec(max_model_len=2048)})
    assert _option(server_command(explicit, MODEL, gpus=1, dtype="float16"), "--max-model-len") == (
        "2048"
    )


def test_user_commands_get_their_placeholders_and_keep_other_braces():
    template = ["sglang", "--model-path", "{model}", "--port={port}", "--tp", "{gpus}"]
    template += ["--host", "{host}", '{"json": {"x": 1}}']
    assert user_command(template, MODEL, port=8001, gpus=4) == [
        *("sglang", "--model-path", str(MODEL), "--port=8001", "--tp", "4"),
        *("--host", "127.0.0.1", '{"json": {"x": 1}}'),
    ]


def test_the_served_name_and_concurrency():
    vllm = EvaluatorSpec(backend="vllm")
    openai = EvaluatorSpec(backend="openai", server=ServerSpec(command=["srv"]))
    assert served_model_name(vllm, MODEL) == SERVED_NAME
    assert served_model_name(openai, MODEL) == str(MODEL)
    assert concurrency(ServerSpec(), gpus=8) == 128
    assert concurrency(ServerSpec(), gpus=0) == 1
    assert concurrency(ServerSpec(concurrency=5), gpus=8) == 5


def test_loglikelihood_tasks_are_refused_on_a_server_without_prompt_logprobs():
    types = {"gsm8k": "generate_until", "hellaswag": "multiple_choice", "wiki": "loglikelihood"}
    openai = EvaluatorSpec(backend="openai", server=ServerSpec(command=["srv"]))
    with pytest.raises(ServerError) as caught:
        check_server_tasks(types, openai)
    assert caught.value.failure_kind is FailureKind.CONFIG
    assert "hellaswag, wiki" in str(caught.value)
    check_server_tasks({"gsm8k": "generate_until"}, openai)
    check_server_tasks(types, EvaluatorSpec(backend="vllm"))  # vLLM echoes prompt logprobs
    check_server_tasks(types, EvaluatorSpec(backend="hf"))
    claimed = ServerSpec(command=["srv"], prompt_logprobs=True)
    check_server_tasks(types, EvaluatorSpec(backend="openai", server=claimed))


@pytest.mark.parametrize(
    ("evaluator", "words"),
    [
        ({"backend": "openai"}, "server.command is required"),
        ({"backend": "vllm", "server": {"command": ["vllm"]}}, "extraArgs"),
        ({"backend": "hf", "server": {"port": 9000}}, "only to backends vllm and openai"),
        ({"backend": "vllm", "cpuOffload": True}, "cpuOffload applies only"),
        ({"device": "gpu0"}, "device"),
        ({"backend": "openai", "server": {"command": []}}, "command"),
    ],
)
def test_evaluator_settings_that_cannot_work_are_refused(evaluator: dict, words: str):
    with pytest.raises(ValidationError, match=words):
        EvaluatorSpec.model_validate(evaluator)


def test_server_defaults():
    assert EvaluatorSpec(backend="vllm").server_settings.prompt_logprobs is True
    openai = EvaluatorSpec.model_validate({"backend": "openai", "server": {"command": ["s"]}})
    assert openai.server_settings.prompt_logprobs is False
    assert openai.server_settings.ready_timeout_seconds == 1800


def test_local_mode_refuses_server_backends_before_reading_a_checkpoint(tmp_path: Path):
    from mergerunner.evaluate import EvaluationError
    from mergerunner.resident import ResidentEvaluator

    with pytest.raises(EvaluationError, match="local mode") as caught:
        ResidentEvaluator(
            [tmp_path / "not-there", tmp_path / "nor-this"],
            held_in=[],
            evaluator=EvaluatorSpec(backend="vllm"),
        )
    assert caught.value.failure_kind is FailureKind.CONFIG

"""The server backends end to end against a real OpenAI-compatible server, `transformers serve`;
and the hf backend's placement refusing a model that fits nowhere.

A trial with `backend: openai` merges the toy checkpoints, starts `transformers serve` on the
merged directory, waits for /v1/models, scores through lm-eval's local-completions and stops the
server. Under greedy decoding its generate_until scores equal the in-process hf backend's.
`backend: vllm` differs only by the command line (`mergerunner.server.vllm_command`, unit
tested); vLLM does not run on a CPU.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from support.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 12


def _serve_command() -> list[str]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    assert exe, "transformers' CLI is not installed beside this interpreter"
    return [
        *(exe, "serve", "{model}", "--host", "{host}", "--port", "{port}"),
        *("--device", "cpu", "--dtype", "float32", "--log-level", "warning"),
    ]


def _doc(toy_pool: Any, evaluator: dict[str, Any], *, held_out: bool = False) -> Any:
    from mergerunner.trial import TrialDocument

    names = list(toy_pool.checkpoints)
    tasks = [{"task": t, "metric": m, "limit": LIMIT} for t, m in toy_pool.heldin.items()]
    out = [{"task": t, "metric": m, "limit": LIMIT} for t, m in toy_pool.heldout.items()]
    return TrialDocument.model_validate(
        {
            "id": "t-server",
            "checkpoints": [{"name": n, "uri": str(toy_pool.checkpoints[n])} for n in names],
            "weights": {n: [0.4, 0.3, 0.2, 0.1][i % 4] for i, n in enumerate(names)},
            "dtype": "float32",
            "heldIn": tasks,
            "heldOut": out if held_out else [],
            "customTasksDir": str(toy_pool.tasks_dir),
            "evaluator": {"device": "cpu", **evaluator},
        }
    )


def _openai(**server: Any) -> dict[str, Any]:
    return {
        "backend": "openai",
        "server": {"command": _serve_command(), "port": free_port(), **server},
    }


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers serve lists the models of the hub cache on /v1/models; an empty one will do.
    (tmp_path / "hub").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def _run(doc: Any, tmp_path: Path) -> Any:
    from mergerunner.run import run_trial

    return run_trial(doc, cache_dir=tmp_path / "cache", work_dir=tmp_path)


def test_generate_until_scores_equal_the_hf_backend(
    toy_pool: Any, tmp_path: Path, hub_cache: None, capfd: pytest.CaptureFixture[str]
) -> None:
    hf = _run(_doc(toy_pool, {"backend": "hf", "batchSize": 1}), tmp_path)
    served = _run(_doc(toy_pool, _openai()), tmp_path)
    assert hf.status == "succeeded", hf.error
    assert served.status == "succeeded", served.error
    assert served.held_in == hf.held_in
    assert served.digest == hf.digest
    assert any(score > 0 for score in served.held_in.values())
    assert "[server]" in capfd.readouterr().err  # the server's output is in the trial log


def test_a_loglikelihood_task_is_refused_before_the_merge(
    toy_pool: Any, tmp_path: Path, hub_cache: None
) -> None:
    result = _run(_doc(toy_pool, _openai(), held_out=True), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "config"
    assert "toy_max" in result.error and "promptLogprobs" in result.error
    assert result.timings.merge_s == 0.0  # refused before any merge or server start


def test_a_server_claiming_prompt_logprobs_is_checked_before_scoring(
    toy_pool: Any, tmp_path: Path, hub_cache: None
) -> None:
    result = _run(_doc(toy_pool, _openai(promptLogprobs=True), held_out=True), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "config"
    assert "no prompt log-probabilities" in result.error


def test_a_server_that_dies_is_a_server_failure_with_its_last_words(
    toy_pool: Any, tmp_path: Path
) -> None:
    crash = [sys.executable, "-c", "import sys; print('no GPU for you'); sys.exit(3)"]
    evaluator = {"backend": "openai", "server": {"command": crash, "port": free_port()}}
    result = _run(_doc(toy_pool, evaluator), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "server-failed"
    assert "code 3" in result.error and "no GPU for you" in result.error


def test_a_server_that_never_answers_times_out(toy_pool: Any, tmp_path: Path) -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = {"command": silent, "port": free_port(), "readyTimeoutSeconds": 2}
    result = _run(_doc(toy_pool, {"backend": "openai", "server": server}), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "server-failed"
    assert "readyTimeoutSeconds" in result.error
    assert result.timings.evaluate_s < 30  # stopped at once, not waited out


def test_a_model_the_devices_cannot_hold_fails_before_the_merge(
    toy_pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergerunner.devices

    monkeypatch.setattr(mergerunner.devices, "host_available_bytes", lambda: 100_000)
    result = _run(_doc(toy_pool, {"backend": "hf"}), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "out-of-memory"
    assert "short" in result.error and "bytes" in result.error
    assert result.timings.merge_s == 0.0


def test_token_prompts_for_vllm_are_the_tokens_the_hf_backend_scores(toy_pool: Any) -> None:
    """vLLM gets token ids: lm-eval must encode contexts and continuations exactly as its hf
    backend does, or a loglikelihood's context length would be off by the BOS token."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.server import make_server_lm
    from mergerunner.trial import EvaluatorSpec

    model_dir = Path(toy_pool.checkpoints["base"])
    server = make_server_lm(EvaluatorSpec(backend="vllm"), "http://127.0.0.1:9", model_dir, gpus=1)
    assert server.tokenized_requests
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hf = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), device="cpu")
    for context, continuation in [("rev abc=", "cba"), ("sort 4213=", "1234")]:
        assert server.tok_encode(context) == hf.tok_encode(context)
        assert server.tok_encode(context)[0] == hf.tokenizer.bos_token_id
        assert server._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
    served = make_server_lm(
        EvaluatorSpec.model_validate({"backend": "openai", "server": {"command": ["s"]}}),
        "http://127.0.0.1:9",
        model_dir,
        gpus=0,
    )
    assert not served.tokenized_requests  # text for servers without prompt log-probabilities


DIES_ON_FIRST_REQUEST = """
import http.server, json, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        print("out of memory while generating", flush=True)
        os._exit(9)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_that_dies_while_scoring_is_a_server_failure(
    toy_pool: Any, tmp_path: Path
) -> None:
    command = [sys.executable, "-c", DIES_ON_FIRST_REQUEST, "{port}"]
    evaluator = {"backend": "openai", "server": {"command": command, "port": free_port()}}
    result = _run(_doc(toy_pool, evaluator), tmp_path)
    assert result.status == "failed"
    assert result.error_kind == "server-failed"
    assert "while scoring" in result.error and "out of memory while generating" in result.error

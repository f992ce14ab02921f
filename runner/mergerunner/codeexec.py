"""Running model-generated programs (mbpp, humaneval): only by opt-in, and each in a sandbox.

lm-eval's code tasks score a completion by executing it with the task's tests, through the
Hugging Face `code_eval` metric, which lm-eval fetches from the Hub when the task module is
imported and which runs programs in forked workers of the evaluating process — with its
environment (the storage credentials) and its file system (the mounted credentials Secret).
The runner replaces that metric with `SandboxedCodeEval`, same interface, no download:

- each program runs in its own child process: `python -I -S` (no site-packages, no user
  paths), working directory an empty temporary folder, environment reduced to `PATH`/`LANG`;
- resource limits: CPU seconds (`RLIMIT_CPU`), address space (`RLIMIT_AS`), file size, open
  files, no core dumps, plus a wall-clock deadline after which the parent kills the group;
- Landlock (Linux >= 5.13, no privilege needed, works under the RuntimeDefault seccomp
  profile): the child can read only the Python standard library and the system libraries and
  write only its temporary folder, so a mounted credentials file is unreadable; from Landlock
  ABI 4 (Linux 6.7) TCP connect/bind are denied too;
- a new network namespace when unprivileged user namespaces are allowed (no interface but a
  down loopback); most pods do not allow them, and there Landlock's TCP rule is what holds;
- a Python audit hook in the child refusing sockets, subprocesses, `fork`/`exec`, signals and
  `ctypes` — a second layer, not a boundary by itself.

`isolation()` reports which layers this machine provides; the runner logs it. Without
`allowCodeExecution` nothing is executed: the loader refuses `code_eval` and the search is
refused before it starts (docs/trial-contract.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.trial import FailureKind, TrialError

CODE_METRICS = frozenset({"code_eval"})
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_BYTES = 1 << 30
ALLOW_FIELD = "spec.objective.allowCodeExecution"


class CodeExecutionRefused(TrialError):
    """A task wants to execute generated code and the search did not allow it."""

    failure_kind = FailureKind.CONFIG


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 3
    wall_seconds: float = DEFAULT_TIMEOUT_S * 2
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass(frozen=True)
class RunOutcome:
    passed: bool
    result: str  # "passed", "failed: <exit>", "timed out"


# The child's first code, before the program: limits, namespaces, Landlock, audit hook.
_BOOTSTRAP = textwrap.dedent(
    r"""
    import ctypes, json, os, resource, sys
    cfg = json.loads(sys.argv[1])
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    if cfg["netns"]:
        libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET; may fail: fine
    def landlock(read_dirs, write_dirs):
        abi = libc.syscall(444, None, 0, 1)
        if abi < 1:
            return 0
        fs = (1 << 13) - 1
        if abi >= 2: fs |= 1 << 13
        if abi >= 3: fs |= 1 << 14
        if abi >= 5: fs |= 1 << 15
        net = 3 if abi >= 4 else 0
        scoped = 3 if abi >= 6 else 0
        attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
        if ruleset < 0:
            return 0
        class Beneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
        read = (1 << 0) | (1 << 2) | (1 << 3)
        for path, rights in [(p, read) for p in read_dirs] + [(p, fs) for p in write_dirs]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            if not os.path.isdir(path):
                rights &= (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
            rule = Beneath(rights & fs, fd)
            libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0)
            os.close(fd)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        if libc.syscall(446, ruleset, 0) != 0:
            return 0
        return abi
    abi = landlock(cfg["read"], cfg["write"])
    if cfg["require_landlock"] and abi < 1:
        sys.exit(97)
    DENY = ("socket.__new__", "socket.connect", "socket.bind", "subprocess.Popen", "os.system",
            "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
            "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function")
    def hook(event, args):
        if event.startswith(DENY):
            raise PermissionError(f"sandbox: {event} is not allowed")
    del libc, ctypes
    sys.addaudithook(hook)
    source = open(cfg["program"]).read()
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    """
)


def _library_dirs() -> list[str]:
    """What a stdlib-only program may read: the standard library and the system libraries."""
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"], "/usr/lib", "/usr/lib64", "/lib", "/lib64"}
    dirs.add(str(Path(sys.base_prefix) / "lib"))
    return [*sorted(d for d in dirs if Path(d).is_dir()), "/dev/null", "/dev/urandom"]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or another OS)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return max(int(libc.syscall(444, None, 0, 1)), 0)
    except (OSError, AttributeError):
        return 0


def isolation() -> dict[str, Any]:
    """Which layers hold on this machine (logged by the runner, documented in the trial
    contract)."""
    abi = landlock_abi()
    return {
        "landlockAbi": abi,
        "filesystem": abi >= 1,
        "tcp": abi >= 4,
        "environment": True,
        "limits": True,
        "auditHook": True,
    }


def _child_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def run_program(
    program: str, limits: Limits = Limits(), *, require_landlock: bool = False
) -> RunOutcome:
    """Run one program in a sandboxed child; passed when it exits 0 within its limits."""
    with tempfile.TemporaryDirectory(prefix="mergesearch-code-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        cfg = {
            "rlimits": {
                "RLIMIT_CPU": limits.cpu_seconds,
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_FSIZE": limits.file_bytes,
                "RLIMIT_NOFILE": limits.open_files,
                "RLIMIT_CORE": 0,
            },
            "netns": True,
            "read": _library_dirs(),
            "write": [tmp],
            "program": str(path),
            "require_landlock": require_landlock,
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)],
                cwd=tmp,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise TrialError(f"cannot start a sandboxed program: {exc}") from exc
        try:
            code = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return RunOutcome(False, "timed out")
    if code == 0:
        return RunOutcome(True, "passed")
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return RunOutcome(False, "timed out")
    return RunOutcome(False, f"failed: exit {code}")


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples of which c passed (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class SandboxedCodeEval:
    """Drop-in for the `code_eval` metric lm-eval's code tasks load: `compute(references,
    predictions, k)` returns `({"pass@k": mean}, per-task results)`."""

    def __init__(self, limits: Limits = Limits(), workers: int = 2) -> None:
        self.limits = limits
        self.workers = workers

    def compute(
        self,
        references: Sequence[str],
        predictions: Sequence[Sequence[str]],
        k: Sequence[int] = (1, 10, 100),
        num_workers: int | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, float], dict[int, list[tuple[int, dict[str, Any]]]]]:
        limits = self.limits
        if timeout is not None:
            limits = Limits(
                cpu_seconds=max(1, math.ceil(timeout)),
                wall_seconds=timeout * 2,
                memory_bytes=limits.memory_bytes,
            )
        jobs = [
            (task, j, f"{candidate}\n{test}")
            for task, (candidates, test) in enumerate(zip(predictions, references, strict=True))
            for j, candidate in enumerate(candidates)
        ]
        with ThreadPoolExecutor(max_workers=num_workers or self.workers) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[2], limits), jobs))
        results: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for (task, j, _), outcome in zip(jobs, outcomes, strict=True):
            results.setdefault(task, []).append(
                (j, {"task_id": task, "passed": outcome.passed, "result": outcome.result})
            )
        totals = [len(results.get(t, [])) for t in range(len(references))]
        correct = [sum(r["passed"] for _, r in results.get(t, [])) for t in range(len(references))]
        scores = {
            f"pass@{kk}": sum(
                estimate_pass_at_k(n, c, kk) for n, c in zip(totals, correct, strict=True)
            )
            / max(len(references), 1)
            for kk in k
            if all(n >= kk for n in totals)
        }
        return scores, results


@contextlib.contextmanager
def code_metrics(allowed: bool, limits: Limits = Limits()) -> Iterator[None]:
    """While lm-eval loads and scores tasks, `evaluate.load("code_eval")` returns the sandboxed
    metric when code execution is allowed and raises `CodeExecutionRefused` when it is not;
    every other metric loads as usual (offline, from the bundle's HF_HOME)."""
    import evaluate

    original = evaluate.load

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        if path in CODE_METRICS:
            if not allowed:
                raise CodeExecutionRefused(
                    f"metric {path!r} executes generated code; set {ALLOW_FIELD}: true to allow it"
                )
            return SandboxedCodeEval(limits)
        return original(path, *args, **kwargs)

    evaluate.load = load
    saved = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        evaluate.load = original
        if saved is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = saved

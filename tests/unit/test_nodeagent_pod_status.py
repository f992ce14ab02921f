"""The test node agent's pure builders (tests/support/pod_status.py): the Node and Pod statuses
it reports are the shapes a real kubelet and scheduler write, so the Job controller, the
operator and kubectl read them as they would on a real cluster."""

from __future__ import annotations

import pytest

from support.pod_status import (
    FALLBACK_LOG_LINES,
    MAX_MESSAGE_BYTES,
    ContainerRun,
    binding_manifest,
    container_status,
    exit_status,
    finished_pod_status,
    insufficient,
    lost_pod_status,
    node_status,
    parse_quantity,
    running_pod_status,
    should_restart,
    termination_message,
    unschedulable_pod_status,
    waiting_pod_status,
    warning_event,
)

pytestmark = pytest.mark.unit

NOW = "2026-01-02T03:04:05Z"
POD = {
    "metadata": {"name": "trial-0", "namespace": "team", "uid": "u-1"},
    "spec": {"containers": [{"name": "runner", "image": "runner:1"}]},
}


def run(exit_code: int | None = None, **changes: object) -> ContainerRun:
    fields: dict = {
        "name": "runner",
        "image": "runner:1",
        "container_id": "process://u-1",
        "started_at": "2026-01-02T03:00:00Z",
        "exit_code": exit_code,
        "finished_at": None if exit_code is None else NOW,
    }
    return ContainerRun(**{**fields, **changes})


def by_type(conditions: list[dict]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in conditions}


def test_the_node_is_ready_with_its_capacity_allocatable_and_a_fresh_heartbeat() -> None:
    status = node_status("n1", {"cpu": "4", "nvidia.com/gpu": "8"}, NOW)
    assert status["allocatable"] == status["capacity"] == {"cpu": "4", "nvidia.com/gpu": "8"}
    assert by_type(status["conditions"]) == {
        "MemoryPressure": "False",
        "DiskPressure": "False",
        "PIDPressure": "False",
        "Ready": "True",
    }
    assert {c["lastHeartbeatTime"] for c in status["conditions"]} == {NOW}


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("8", 8.0), (2, 2.0), ("64Gi", 64 * 2**30), ("1k", 1000.0), ("3M", 3e6)],
)
def test_quantities_parse_like_kubernetes(text: str | int, value: float) -> None:
    assert parse_quantity(text) == value


def test_insufficient_names_what_the_node_lacks_with_limits_counting_for_extended_resources() -> (
    None
):
    def pod(*resources: dict) -> dict:
        containers = [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)]
        return {"spec": {"containers": containers}}

    capacity = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"}
    assert insufficient(pod({"limits": {"nvidia.com/gpu": "8"}}), capacity) == []
    assert insufficient(pod({"limits": {"nvidia.com/gpu": "9"}}), capacity) == ["nvidia.com/gpu"]
    # two containers add up; a request wins over its limit
    two = pod({"requests": {"cpu": "10"}}, {"requests": {"cpu": "7", "memory": "1Gi"}})
    assert insufficient(two, capacity) == ["cpu"]
    assert insufficient(pod({"requests": {"cpu": "1"}, "limits": {"cpu": "99"}}), capacity) == []
    assert insufficient(pod({"limits": {"example.com/fpga": "1"}}), capacity) == [
        "example.com/fpga"
    ]


def test_a_binding_targets_the_node() -> None:
    binding = binding_manifest("trial-0", "n1")
    assert binding["kind"] == "Binding" and binding["metadata"] == {"name": "trial-0"}
    assert binding["target"] == {"apiVersion": "v1", "kind": "Node", "name": "n1"}


def test_the_termination_message_is_the_file_else_the_log_tail_of_a_failure() -> None:
    log = "\n".join(f"line {i}" for i in range(200))
    assert termination_message("from file", log, 1, "FallbackToLogsOnError") == "from file"
    tail = termination_message("", log, 1, "FallbackToLogsOnError")
    assert tail.splitlines() == [f"line {i}" for i in range(200 - FALLBACK_LOG_LINES, 200)]
    assert termination_message("", log, 0, "FallbackToLogsOnError") == ""  # success: no tail
    assert termination_message("", log, 1, "File") == ""  # the default policy: the file only
    long = "a" * 10 + "b" * MAX_MESSAGE_BYTES
    assert termination_message(long, "", 1, None) == "b" * MAX_MESSAGE_BYTES  # the end is kept


def test_a_running_pod_reports_a_ready_running_container() -> None:
    status = running_pod_status(run(), NOW)
    assert status["phase"] == "Running" and status["startTime"] == "2026-01-02T03:00:00Z"
    assert by_type(status["conditions"])["Ready"] == "True"
    [container] = status["containerStatuses"]
    assert container["ready"] and container["state"] == {
        "running": {"startedAt": "2026-01-02T03:00:00Z"}
    }


@pytest.mark.parametrize(
    ("code", "phase", "reason"), [(0, "Succeeded", "Completed"), (3, "Failed", "Error")]
)
def test_a_finished_pod_reports_its_exit_code_and_message(
    code: int, phase: str, reason: str
) -> None:
    status = finished_pod_status(run(code, message="done"), NOW)
    assert status["phase"] == phase and "reason" not in status
    assert by_type(status["conditions"])["Ready"] == "False"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == code and terminated["reason"] == reason
    assert terminated["message"] == "done" and terminated["finishedAt"] == NOW


def test_a_deadline_becomes_the_pods_reason() -> None:
    status = finished_pod_status(
        run(137, reason="DeadlineExceeded", message="m"), NOW, "DeadlineExceeded"
    )
    assert status["phase"] == "Failed" and status["reason"] == "DeadlineExceeded"
    assert status["message"] == "m"
    assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == "DeadlineExceeded"


def test_a_restarted_container_keeps_its_last_state_and_count() -> None:
    last = {"terminated": {"exitCode": 1}}
    status = container_status(run(restart_count=2, last_state=last))
    assert status["restartCount"] == 2 and status["lastState"] == last


def test_a_waiting_pod_is_pending_with_the_kubelets_reason() -> None:
    status = waiting_pod_status(POD, "CreateContainerConfigError", 'secret "s" not found', NOW)
    assert status["phase"] == "Pending"
    waiting = status["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}


def test_a_pod_the_agent_lost_fails() -> None:
    status = lost_pod_status(NOW)
    assert status["phase"] == "Failed" and status["reason"] == "NodeAgentRestarted"


def test_an_unschedulable_pod_says_what_is_insufficient() -> None:
    status = unschedulable_pod_status(["cpu", "nvidia.com/gpu"], NOW)
    [condition] = status["conditions"]
    assert status["phase"] == "Pending"
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    assert condition["message"] == (
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient nvidia.com/gpu."
    )


def test_a_warning_event_names_the_pod_and_its_source() -> None:
    event = warning_event(POD, "FailedMount", "m", "kubelet", "n1", NOW, "trial-0.abc")
    assert event["metadata"] == {"name": "trial-0.abc"} and event["type"] == "Warning"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "trial-0",
        "namespace": "team",
        "uid": "u-1",
    }
    assert event["source"] == {"component": "kubelet", "host": "n1"}
    assert (event["reason"], event["message"], event["count"]) == ("FailedMount", "m", 1)


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 1, True),
        ("Never", 1, False),
    ],
)
def test_restart_policies(policy: str, code: int, restart: bool) -> None:
    assert should_restart(policy, code) is restart


def test_death_by_signal_reads_as_128_plus_the_signal() -> None:
    assert (exit_status(-9), exit_status(-15), exit_status(0), exit_status(2)) == (137, 143, 0, 2)

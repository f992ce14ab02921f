"""Shared fixtures: the real parts that tests start on this machine live in tests/support/."""

pytest_plugins = [
    "support.s3server",
    "support.toypool",
    "support.cluster",
    "support.nodeagent",
    "support.prometheus",
    "support.taskdata",
]

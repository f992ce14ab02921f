"""The kopf shell keeps the process's state in kopf's memo, not in a mutable module global."""

from __future__ import annotations

import copy

import kopf
import pytest

from mergesearch.operator import handlers

pytestmark = pytest.mark.unit


def test_the_runtime_is_carried_in_kopfs_memo() -> None:
    settings = handlers.ShellSettings(poll_s=5.0)
    memo = kopf.Memo(runtime=handlers.Runtime(settings=settings))
    handlers.configure(settings=kopf.OperatorSettings(), memo=memo)
    runtime = handlers.runtime_of(memo)
    assert runtime.settings.poll_s == 5.0  # the one the operator was started with, kept
    assert handlers.runtime_of(copy.copy(memo)) is runtime  # kopf's per-resource copies share it
    # Started without one (`kopf run`): the startup handler puts a default one in place.
    bare = kopf.Memo()
    handlers.configure(settings=kopf.OperatorSettings(), memo=bare)
    assert handlers.runtime_of(bare).settings == handlers.ShellSettings()
    assert handlers.runtime_of(bare) is not runtime
    module_state = [v for v in vars(handlers).values() if isinstance(v, handlers.Runtime)]
    assert module_state == []


def test_the_shell_settings_are_fixed_for_the_process() -> None:
    settings = handlers.ShellSettings()
    with pytest.raises(AttributeError):
        settings.poll_s = 1.0  # type: ignore[misc]

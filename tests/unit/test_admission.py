"""The admission policies as data: what they match, what they check, and that the chart and
crds/ carry exactly them (the drift itself: tests/unit/test_chart.py; on a real API server:
tests/e2e/test_security.py)."""

from __future__ import annotations

import pytest
import yaml

from mergesearch import admission
from mergesearch.operator import podpolicy

pytestmark = pytest.mark.unit


def test_the_references_policy_checks_the_creators_rights_on_what_the_spec_names() -> None:
    spec = admission.reference_spec()
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["mergesearches"] and set(rule["operations"]) == {
        "CREATE",
        "UPDATE",
    }
    # A metadata-only update (the operator's finalizer patch) is not checked again.
    (condition,) = spec["matchConditions"]
    assert "object.spec != oldObject.spec" in condition["expression"]
    checks = [v["expression"] for v in spec["validations"]]
    assert "resource('secrets')" in checks[0] and "check('get')" in checks[0]
    assert "resource('configmaps')" in checks[1] and "check('get')" in checks[1]
    assert "resource('pods')" in checks[2] and "check('create')" in checks[2]
    messages = [v["messageExpression"] for v in spec["validations"]]
    assert messages[0].startswith("'spec.storage.secretRef.name: ")
    assert messages[1].startswith("'spec.objective.customTasks.configMapRef.name: ")


def test_the_operator_jobs_policy_names_the_operator_and_the_trial_account() -> None:
    spec = admission.operator_job_spec("system:serviceaccount:ops:op", "mergesearch-trial")
    (condition,) = spec["matchConditions"]
    assert condition["expression"] == "request.userInfo.username == 'system:serviceaccount:ops:op'"
    assert spec["variables"] == [
        {"name": "trialServiceAccount", "expression": "'mergesearch-trial'"},
        {"name": "nodeCacheDir", "expression": "''"},
    ]
    text = " ".join(v["expression"] for v in spec["validations"])
    for kind in podpolicy.VOLUME_KINDS:
        assert f"'{kind}'" in text
    assert "projected" not in text
    # hostPath only below the warm evaluators' node cache directory, when one is configured
    assert text.count("hostPath") == 3  # the key, its path twice
    assert "variables.nodeCacheDir != ''" in text and "contains('..')" in text
    for needle in ("automountServiceAccountToken", "serviceAccountName", "runAsNonRoot"):
        assert needle in text


def test_crds_carry_the_references_policy_and_its_binding() -> None:
    policy, binding = yaml.safe_load_all(admission.crds_yaml())
    assert policy["kind"] == "ValidatingAdmissionPolicy"
    assert policy["spec"] == admission.reference_spec()
    assert binding["spec"] == {
        "policyName": admission.REFERENCES,
        "validationActions": ["Deny"],
    }

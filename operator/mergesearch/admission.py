"""ValidatingAdmissionPolicies shipped with the CRD and the chart: the API server's half of the
operator's security (docs/operator.md, "Security").

Two policies, as plain data (one source for `crds/mergesearch-admission.yaml`, the chart's
generated files and the tests):

- **references** (on MergeSearch create, and on updates that change the spec): whoever names a
  Secret (`spec.storage.secretRef`) or a ConfigMap (`spec.objective.customTasks.configMapRef`)
  must be allowed to `get` it, and whoever mounts a PersistentVolumeClaim in the trial template
  must be allowed to `create` pods in the namespace. The trial image is the creator's choice, so
  whatever the operator mounts into a trial pod is the creator's to read; only the API server
  knows who the creator is (the operator sees the object, not the request), so this check is
  an admission policy, decided by the authorizer (`authorizer...check(...)`). A metadata-only
  update (kopf's finalizer, labels) is not checked again: the operator has no right to read
  Secrets and must still be able to patch the resource.
- **operator-jobs** (on Job create/update by the operator's own ServiceAccount, the chart
  fills in its name): the Job's pod must be a hardened trial pod: the trial ServiceAccount, no
  token, one container, no host namespaces, non-root, no privilege, only the volume kinds the
  operator uses. Even a compromised operator process can then not start a pod under another
  ServiceAccount, with a token, as root or on the host's namespaces or file system.

What a policy cannot see it does not check: the operator's allow-list of the pod template
(operator/podpolicy.py) is complete without these policies and refuses the same things in the
first reconcile; the policies refuse earlier, and they hold for requests the operator never
sees.
"""

from __future__ import annotations

from typing import Any

import yaml

from mergesearch.operator import podpolicy
from mergesearch.spec import API_GROUP

REFERENCES = "mergesearch-references"
OPERATOR_JOBS = "mergesearch-operator-jobs"
API = "admissionregistration.k8s.io/v1"

# The pod spec of spec.execution.template, whichever form the template has.
_TEMPLATE_POD = (
    "!has(object.spec.execution) || !has(object.spec.execution.template) "
    "|| object.spec.execution.template == null ? {} "
    ": has(object.spec.execution.template.spec) || has(object.spec.execution.template.metadata) "
    "? (has(object.spec.execution.template.spec) ? object.spec.execution.template.spec : {}) "
    ": object.spec.execution.template"
)
_CAN = "authorizer.group('').resource('{resource}').namespace(request.namespace)"


def _validation(expression: str, message: str, reason: str = "Forbidden") -> dict[str, str]:
    return {"expression": expression, "messageExpression": message, "reason": reason}


def reference_spec() -> dict[str, Any]:
    """The `spec` of the references policy."""
    secret_name = "object.spec.storage.secretRef.name"  # noqa: S105 - a CEL path, no secret
    config_map = "object.spec.objective.customTasks.configMapRef.name"
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [API_GROUP],
                    "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["mergesearches"],
                }
            ]
        },
        "matchConditions": [
            {
                "name": "spec-set-or-changed",
                "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec",
            }
        ],
        "variables": [
            {"name": "pod", "expression": _TEMPLATE_POD},
            {
                "name": "claims",
                "expression": "has(variables.pod.volumes) ? variables.pod.volumes.filter(v, "
                "has(v.persistentVolumeClaim)).map(v, v.name) : []",
            },
        ],
        "validations": [
            _validation(
                "!has(object.spec.storage) || object.spec.storage == null "
                "|| !has(object.spec.storage.secretRef) || object.spec.storage.secretRef == null "
                f"|| {_CAN.format(resource='secrets')}.name({secret_name}).check('get').allowed()",
                f"'spec.storage.secretRef.name: you may not get the Secret ' + {secret_name} + "
                "': trial pods mount it, and run an image of your choosing'",
            ),
            _validation(
                "!has(object.spec.objective.customTasks) "
                "|| object.spec.objective.customTasks == null "
                "|| !has(object.spec.objective.customTasks.configMapRef) "
                "|| object.spec.objective.customTasks.configMapRef == null "
                f"|| {_CAN.format(resource='configmaps')}.name({config_map})"
                ".check('get').allowed()",
                "'spec.objective.customTasks.configMapRef.name: you may not get the ConfigMap ' "
                f"+ {config_map} + ': trial pods mount it'",
            ),
            _validation(
                "size(variables.claims) == 0 "
                f"|| {_CAN.format(resource='pods')}.check('create').allowed()",
                "'spec.execution.template: volumes ' + variables.claims.join(', ') + "
                "' mount a PersistentVolumeClaim, which takes the right to create pods in ' "
                "+ request.namespace",
            ),
        ],
    }


def operator_job_validations() -> list[dict[str, str]]:
    """What a Job created by the operator's ServiceAccount must be: a hardened trial pod.
    `variables.trialServiceAccount` is the trial ServiceAccount's name (the chart's), and
    `variables.nodeCacheDir` the warm evaluators' node cache directory ('' when off): the one
    hostPath an operator Job may mount is a directory below it (no '..'), nothing else of the
    host."""
    pod = "object.spec.template.spec"
    volumes = ["name", *podpolicy.VOLUME_KINDS, "secret", "configMap"]
    node_cache = (
        "(variables.nodeCacheDir != '' && v.all(k, k in ['name', 'hostPath']) "
        "&& v.hostPath.path.startsWith(variables.nodeCacheDir + '/') "
        "&& !v.hostPath.path.contains('..'))"
    )
    return [
        _validation(
            f"has({pod}.serviceAccountName) "
            f"&& {pod}.serviceAccountName == variables.trialServiceAccount",
            "'spec.template.spec.serviceAccountName: trial pods run under ' "
            "+ variables.trialServiceAccount",
        ),
        _validation(
            f"has({pod}.automountServiceAccountToken) && !{pod}.automountServiceAccountToken",
            "'spec.template.spec.automountServiceAccountToken: must be false'",
        ),
        _validation(
            f"!has({pod}.volumes) || {pod}.volumes.all(v, v.all(k, k in {volumes!r}) "
            f"|| {node_cache})",
            f"'spec.template.spec.volumes: only kinds {', '.join(volumes[1:])} (and the node "
            "cache directory)'",
        ),
        _validation(
            f"size({pod}.containers) == 1 && !has({pod}.initContainers) "
            f"&& !has({pod}.ephemeralContainers)",
            "'spec.template.spec.containers: one container (the runner), no others'",
        ),
        _validation(
            f"!(has({pod}.hostNetwork) && {pod}.hostNetwork) "
            f"&& !(has({pod}.hostPID) && {pod}.hostPID) "
            f"&& !(has({pod}.hostIPC) && {pod}.hostIPC) && !has({pod}.nodeName)",
            "'spec.template.spec: no host namespaces, no nodeName'",
        ),
        _validation(
            f"has({pod}.securityContext) && has({pod}.securityContext.runAsNonRoot) "
            f"&& {pod}.securityContext.runAsNonRoot "
            f"&& (!has({pod}.securityContext.runAsUser) || {pod}.securityContext.runAsUser != 0)",
            "'spec.template.spec.securityContext: runAsNonRoot, never user 0'",
        ),
        _validation(
            f"{pod}.containers.all(c, has(c.securityContext) "
            "&& has(c.securityContext.privileged) && !c.securityContext.privileged "
            "&& has(c.securityContext.allowPrivilegeEscalation) "
            "&& !c.securityContext.allowPrivilegeEscalation "
            "&& has(c.securityContext.readOnlyRootFilesystem) "
            "&& c.securityContext.readOnlyRootFilesystem "
            "&& !(has(c.securityContext.capabilities) && has(c.securityContext.capabilities.add))"
            "&& !(has(c.securityContext.runAsUser) && c.securityContext.runAsUser == 0))",
            "'spec.template.spec.containers[0].securityContext: unprivileged, no capabilities "
            "added, read-only root file system, never user 0'",
        ),
    ]


def operator_job_spec(
    operator_user: str, trial_service_account: str, node_cache_dir: str = ""
) -> dict[str, Any]:
    """The `spec` of the operator-jobs policy for one operator ServiceAccount's username
    (`system:serviceaccount:NAMESPACE:NAME`)."""
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": ["batch"],
                    "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["jobs"],
                }
            ]
        },
        "matchConditions": [
            {
                "name": "by-the-operator",
                "expression": f"request.userInfo.username == '{operator_user}'",
            }
        ],
        "variables": [
            {"name": "trialServiceAccount", "expression": f"'{trial_service_account}'"},
            {"name": "nodeCacheDir", "expression": f"'{node_cache_dir.rstrip('/')}'"},
        ],
        "validations": operator_job_validations(),
    }


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def binding(name: str, policy_name: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": policy_name, "validationActions": ["Deny"]},
    }


HEADER = (
    "# Generated by `mergesearch crd --admission` from operator/mergesearch/admission.py: do "
    'not edit.\n# The references policy (docs/operator.md, "Security"); apply it with the CRD:\n'
    "#   kubectl apply --server-side -f crds/\n"
)


def crds_yaml() -> str:
    """`crds/mergesearch-admission.yaml`: the references policy and its binding. (The
    operator-jobs policy names the operator's ServiceAccount, so only the chart ships it.)"""
    docs = [policy(REFERENCES, reference_spec()), binding(REFERENCES, REFERENCES)]
    return HEADER + yaml.safe_dump_all(docs, sort_keys=False, width=100)

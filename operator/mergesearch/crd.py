"""The MergeSearch CustomResourceDefinition, generated from the spec and status models.

Generating the openAPI schema from `mergesearch.spec` (rather than writing it by hand) is what
keeps the API server's validation and the operator's in step: `crds/mergesearch.yaml` and the
chart's copy are this function's output, and a unit test fails when either drifts.

Pydantic's JSON Schema is turned into a *structural* schema (no $ref, every node typed,
`nullable` instead of `anyOf: [.., null]`), then the API-server-only parts are added: CEL rules
for what JSON Schema cannot say (unique names, immutability), defaults for nested objects so
that the API server fills them, the status subresource and the printer columns.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from mergesearch.operator.status import MergeSearchStatus
from mergesearch.spec import API_GROUP, API_VERSION, KIND, MergeSearchSpec

PLURAL = "mergesearches"
SINGULAR = "mergesearch"
SHORT_NAMES = ["msearch", "ms"]
CATEGORIES = ["mergesearch"]

_DROP = {"title", "additionalProperties", "$defs"}


# CEL rules keyed by the JSON path of the node they sit on.
def _immutable(what: str) -> list[dict[str, str]]:
    return [{"rule": "self == oldSelf", "message": f"{what} is immutable"}]


_RULES: dict[str, list[dict[str, str]]] = {
    "spec": [
        {
            # The same refusal as spec.cluster_errors, at `kubectl apply`: a warm evaluator
            # scores its resident model in-process (hf); a server backend runs in trial Jobs.
            "rule": "!has(self.execution) || !has(self.execution.mode) "
            "|| self.execution.mode != 'warm' || !has(self.objective.evaluator) "
            "|| !has(self.objective.evaluator.backend) || self.objective.evaluator.backend == 'hf'",
            "message": "execution.mode: warm evaluators score in-process with evaluator.backend "
            "hf; a server backend (vllm, openai) runs in trial Jobs: use mode jobs",
        }
    ],
    "spec.checkpoints": [
        {
            "rule": "self.all(c, self.exists_one(d, d.name == c.name))",
            "message": "checkpoint names must be unique",
        },
        {"rule": "self == oldSelf", "message": "checkpoints are immutable"},
    ],
    "spec.merge": [{"rule": "self == oldSelf", "message": "merge is immutable"}],
    "spec.objective": [
        {"rule": "self == oldSelf", "message": "objective is immutable"},
        {
            "rule": "!has(self.heldOut) || self.heldOut.all(o, !self.heldIn.exists(i, "
            "i.task == o.task))",
            "message": "a task may not be both held-in and held-out",
        },
        {
            "rule": "self.heldIn.all(t, self.heldIn.exists_one(u, u.task == t.task))",
            "message": "held-in tasks must be unique",
        },
    ],
    "spec.objective.evaluator.batchSize": [
        {
            # int-or-string: JSON Schema cannot bound the integer branch alone.
            "rule": "type(self) == string ? self == 'auto' : self >= 1",
            "message": "must be an integer of at least 1, or 'auto'",
        }
    ],
    "spec.objective.customTasks": [
        {
            "rule": "has(self.configMapRef) != has(self.path)",
            "message": "set exactly one of configMapRef and path",
        }
    ],
    "spec.search": [
        {
            "rule": "!has(self.baselines) || self.baselines.all(b, "
            "self.baselines.exists_one(c, c == b))",
            "message": "each baseline may be listed once",
        },
        {
            "rule": "!has(self.baselines) || size(self.baselines) > 0 "
            "|| (has(self.start) && self.start == 'uniform')",
            "message": "start: best-baseline needs at least one baseline",
        },
    ],
}

# What the optimizer's state depends on may not change under it; budgets may. The rules sit
# on `search` (always there: it defaults to `{}`), not on the fields: a transition rule on a
# field is skipped when the old or the new object lacks it, so adding or removing an optional
# field (populationSize, sigma0, baselines) would get through. `checkpoints` and `objective`
# are required and `merge` defaults to `{}`, so their whole-object rules above always run.
IMMUTABLE_SEARCH_FIELDS = (
    "seed",
    "sigma0",
    "start",
    "populationSize",
    "baselines",
    "failurePolicy",
)


def _unchanged(name: str) -> dict[str, str]:
    return {
        "rule": f"has(self.{name}) == has(oldSelf.{name}) && "
        f"(!has(self.{name}) || self.{name} == oldSelf.{name})",
        "message": f"search.{name} is immutable (it may be neither changed, added nor removed)",
    }


_RULES["spec.search"] += [_unchanged(name) for name in IMMUTABLE_SEARCH_FIELDS]

# Bounds the CEL cost estimator needs (it assumes the worst for unbounded lists and strings).
_MAX_ITEMS = {"spec.objective.heldIn": 64, "spec.objective.heldOut": 64, "spec.search.baselines": 3}
_MAX_LENGTH = {
    "spec.checkpoints[].name": 63,
    "spec.checkpoints[].uri": 2048,
    "task": 256,
    "device": 16,
}

# The pod template stays free-form for the API server (its allow-list is the operator's,
# operator/podpolicy.py, refused by name in the first reconcile), but its shape is typed where
# a wrong shape would otherwise reach the operator: `containers` is a list of objects, in a
# PodTemplateSpec (`spec.containers`) and in the bare pod-spec form alike.
_CONTAINERS = {
    "type": "array",
    "description": "At most one container, the runner (docs/operator.md).",
    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
}
_POD_SPEC = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {"containers": _CONTAINERS},
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve({**target, **extra}, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any], path: str, *, bounded: bool = True) -> dict[str, Any]:
    """One JSON-Schema node → one structural openAPI node. `bounded` (the spec): strings get
    a maximum length and maps become free-form objects (what the CEL cost estimator and the
    spec's validation want); unbounded (the status): maps keep their value type."""
    drop = _DROP if bounded else _DROP - {"additionalProperties"}
    node = {k: v for k, v in node.items() if k not in drop}
    if node.get("additionalProperties") in (True, False):
        node.pop("additionalProperties")
    nullable = False
    if "anyOf" in node:
        any_of = node.pop("anyOf")
        options = [o for o in any_of if o.get("type") != "null"]
        nullable = len(options) < len(any_of)
        types = {o.get("type") for o in options}
        if types == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
            if node.get("default") is None:
                node.pop("default", None)
        elif len(options) > 1:
            # A scalar of several types (applyChatTemplate: true or a name; genKwargs values):
            # structural schemas have no such type, so the API server keeps any value and the
            # operator's model validates it (SpecInvalid naming the field).
            node = {k: v for k, v in node.items() if k == "description"}
            node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            (only,) = options
            node = {k: v for k, v in {**only, **node}.items() if k not in drop}
            if node.get("additionalProperties") in (True, False):
                node.pop("additionalProperties")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", 0) is None:
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {
                name: _structural(child, f"{path}.{name}", bounded=bounded)
                for name, child in value.items()
            }
        elif key == "items":
            out[key] = _structural(value, f"{path}[]", bounded=bounded)
        elif key == "additionalProperties":
            out[key] = _structural(value, f"{path}{{}}", bounded=bounded)
        elif key in {"exclusiveMinimum", "exclusiveMaximum"}:
            # JSON Schema's numeric form → openAPI v3.0's boolean flag beside minimum/maximum.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("type") == "object" and not ("properties" in out or "additionalProperties" in out):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if nullable:
        out["nullable"] = True
    if path in _MAX_ITEMS:
        out["maxItems"] = _MAX_ITEMS[path]
    leaf = path.rsplit(".", 1)[-1]
    if bounded and out.get("type") == "string" and "enum" not in out:
        out.setdefault("maxLength", _MAX_LENGTH.get(path, _MAX_LENGTH.get(leaf, 4096)))
    if path in _RULES:
        out["x-kubernetes-validations"] = _RULES[path]
    if path == "spec.execution.template":
        out["properties"] = {
            "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "spec": copy.deepcopy(_POD_SPEC),
            "containers": copy.deepcopy(_CONTAINERS),
        }
    return out


def _default_empty_objects(node: dict[str, Any]) -> None:
    """Give optional object fields a `{}` default so the API server fills their defaults too."""
    required = set(node.get("required", []))
    for name, child in node.get("properties", {}).items():
        if (
            child.get("type") == "object"
            and "properties" in child
            and name not in required
            and not child.get("nullable")
            and not child.get("x-kubernetes-preserve-unknown-fields")  # the pod template's
            and "default" not in child
        ):
            child["default"] = {}
        _default_empty_objects(child)
        if "items" in child:
            _default_empty_objects(child["items"])


def spec_schema() -> dict[str, Any]:
    raw = MergeSearchSpec.model_json_schema(by_alias=True)
    resolved = _resolve(raw, raw.get("$defs", {}))
    schema = _structural(resolved, "spec")
    _default_empty_objects(schema)
    return schema


def status_schema() -> dict[str, Any]:
    """The status subresource's schema, from the operator's status model.

    Typed throughout, so the API server checks what the operator writes; the one open part is
    `optimizer`, the engine's opaque state (a string now, a nested document from earlier
    operator versions), kept with x-kubernetes-preserve-unknown-fields. Maps (scores,
    weights) keep their value type (additionalProperties). Nothing is required but a
    condition's `type` and `status` (the list's map keys): the status is the operator's to
    write, and a partial document (a merge patch of a few fields) stays valid. No string length
    bounds either: there are no CEL rules to cost, and the optimizer's state is tens of KB.
    """
    raw = MergeSearchStatus.model_json_schema(by_alias=True)
    resolved = _resolve(raw, raw.get("$defs", {}))
    return _status_node(_structural(resolved, "status", bounded=False))


def _status_node(node: dict[str, Any]) -> dict[str, Any]:
    """Drop `required` except on the items of a list keyed by map keys (conditions); drop
    `nullable` and `default` (the operator leaves unset fields out, and the API server must
    not fill in what it did not write); a model's docstring becomes a one-line description."""
    out = {k: v for k, v in node.items() if k not in ("required", "nullable", "default")}
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    for key in ("properties",):
        if key in out:
            out[key] = {name: _status_node(child) for name, child in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _status_node(out["additionalProperties"])
    if "items" in out:
        items = _status_node(out["items"])
        if "x-kubernetes-list-map-keys" in out:
            items["required"] = node["items"]["required"]
        out["items"] = items
    return out


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Iteration", "type": "integer", "jsonPath": ".status.iteration"},
    {"name": "Trials", "type": "integer", "jsonPath": ".status.trials.finished"},
    # A string the operator formats with 4 decimals (status.bestFitness); a number column
    # would print all 16 digits.
    {"name": "Best", "type": "string", "jsonPath": ".status.bestFitness"},
    {"name": "Confirmed", "type": "string", "jsonPath": ".status.winnerFitness"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a plain dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A CMA-ES search over linear merges of checkpoints.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `mergesearch crd` from the spec and status models (mergesearch.spec,\n"
    "# mergesearch.operator.status): do not edit.\n"
)


class _NoAliases(yaml.SafeDumper):
    """Repeated nodes are written out in full: anchors confuse readers of a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    return HEADER + yaml.dump(crd(), Dumper=_NoAliases, sort_keys=False, width=100)

"""The Kubernetes operator: a kopf shell around pure reconcile logic.

- `jobs`: trial Job manifests (names, labels, the enforced pod security) — pure;
- `observe`: what the operator reads from Jobs and pods (termination messages) — pure;
- `status`: the status document and its conditions, bounded in size — pure;
- `reconcile`: given spec, status and observed Jobs, the status to write and the Jobs to create
  or delete — pure;
- `events`: which milestones deserve a Kubernetes Event — pure;
- `kube`: a thin aiohttp client for the few API calls kopf does not make for us;
- `handlers`: the kopf shell; `__main__`: `python -m mergesearch.operator`.

See docs/operator.md.
"""

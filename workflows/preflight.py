"""Before a suite burns GPU hours: is the cluster ready for this workflow? Each check says ok, PROBLEM (with
what to do) or warning (could not be verified, or worth knowing); a problem stops the submission.

What is checked is read from the rendered workflow itself, so the checks and the pods cannot disagree: the
Secret keys its pods' environment requires, its ServiceAccount, its training pods' GPU request, node
affinity and tolerations (and, with --on-demand-after, the on-demand affinity the retries switch to).
A check the API does not let you make (403) is a warning with the kubectl command to check it by hand.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from workflows import builder as rw
from workflows.kube import ApiError, Kube

OK, PROBLEM, WARNING = "ok", "PROBLEM", "warning"
EXECUTOR_VERBS = ("create", "patch")  # what Argo v4's executor does to workflowtaskresults
SCALE_FROM_ZERO = (
    "a node pool that scales from zero shows no nodes until pods ask for them: then pass --skip-preflight"
)


@dataclass(frozen=True)
class Check:
    status: str  # OK, PROBLEM or WARNING
    message: str


def render(checks: list[Check]) -> str:
    return "\n".join(f"  {c.status:<8} {c.message}" for c in checks)


def problems(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == PROBLEM]


# ---------------------------------------------------------------------------------------------- the checks


def run(kube: Kube, s: rw.Settings, workflow: dict) -> list[Check]:
    """Every check for this workflow, in order; ClusterError when the API cannot be used at all."""
    ns = s.namespace
    checks = [argo_installed(kube)]
    namespace = namespace_exists(kube, ns)
    checks.append(namespace)
    if namespace.status != PROBLEM:  # a missing namespace has no Secret or ServiceAccount either
        for name, (required, optional) in secret_keys(workflow).items():
            checks.append(secret_has_keys(kube, ns, name, required, optional, cloud=s.profile != "local"))
        checks.append(
            service_account_may_report(kube, ns, workflow["spec"].get("serviceAccountName") or "default")
        )
    if s.uses_gpu:
        checks += gpu_nodes(kube, s, workflow)
    checks.append(image_pinned(s))
    return checks


def argo_installed(kube: Kube) -> Check:
    try:
        found = {r.get("name") for r in kube.api_resources().get("resources") or []}
    except ApiError as e:
        if e.code == 404:
            return Check(PROBLEM, "the Workflow CRD (workflows.argoproj.io) is not installed: install Argo Workflows "
                                  "(docs/cluster.md, step 2)")  # fmt: skip
        return Check(WARNING, f"whether Argo Workflows is installed is not verified ({e}): check by hand with "
                              "kubectl get crd workflows.argoproj.io")  # fmt: skip
    if "workflows" not in found:
        return Check(PROBLEM, "the API group argoproj.io/v1alpha1 has no workflows resource: install Argo "
                              "Workflows v4 (docs/cluster.md, step 2)")  # fmt: skip
    if "workflowtaskresults" not in found:
        return Check(WARNING, "Argo's CRDs have no workflowtaskresults: this is not Argo Workflows v4, which "
                              "the pods' executor permissions are written for (docs/cluster.md, step 2)")  # fmt: skip
    return Check(OK, "Argo Workflows is installed (workflows.argoproj.io/v1alpha1)")


def namespace_exists(kube: Kube, ns: str) -> Check:
    try:
        phase = (kube.namespace(ns).get("status") or {}).get("phase")
    except ApiError as e:
        if e.code == 404:
            return Check(PROBLEM, f"namespace {ns} does not exist: kubectl apply -k k8s/overlays/local (or cloud) "
                                  "creates it with its Secret, ServiceAccounts and RBAC; or pass --namespace")  # fmt: skip
        return Check(
            WARNING, f"namespace {ns} not verified ({e}): check by hand with kubectl get namespace {ns}"
        )
    if phase == "Terminating":
        return Check(PROBLEM, f"namespace {ns} is being deleted: wait for it to go, then kubectl apply -k "
                              "k8s/overlays/local (or cloud)")  # fmt: skip
    return Check(OK, f"namespace {ns} exists")


def secret_keys(workflow: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Secret name -> (keys some pod requires, keys read only if present), from the pods' environment."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for template in workflow["spec"]["templates"]:
        for env in (template.get("container") or {}).get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            required, optional = found.setdefault(ref["name"], ([], []))
            target = optional if ref.get("optional") else required
            if ref["key"] not in target:
                target.append(ref["key"])
    for required, optional in found.values():
        optional[:] = [k for k in optional if k not in required]
    return found


def secret_has_keys(kube: Kube, ns: str, name: str, required: list[str], optional: list[str],
                    cloud: bool) -> Check:  # fmt: skip
    create = (f"kubectl -n {ns} create secret generic {name} "
              + " ".join(f"--from-literal={k}=..." for k in required) + " (k8s/base/s3-secret.yaml)")  # fmt: skip
    try:
        secret = kube.secret(ns, name)
    except ApiError as e:
        if e.code == 404:
            return Check(PROBLEM, f"Secret {name} does not exist in namespace {ns}: the pods read "
                                  f"{', '.join(required)} from it; create it: {create}")  # fmt: skip
        return Check(WARNING, f"Secret {name} not verified ({e}): check its keys by hand with kubectl -n {ns} "
                              f"describe secret {name} (the pods need {', '.join(required)})")  # fmt: skip
    data = secret.get("data") or {}
    missing = [k for k in required if k not in data]
    empty = [k for k in required if k in data and not base64.b64decode(data[k] or "")]
    if missing or empty:
        what = " and ".join(([f"lacks {', '.join(missing)}"] if missing else [])
                            + ([f"has an empty {', '.join(empty)}"] if empty else []))  # fmt: skip
        return Check(
            PROBLEM, f"Secret {name} in namespace {ns} {what}, which the pods read: recreate it: {create}"
        )
    present = [k for k in optional if k in data]
    extra = f" (and {', '.join(present)})" if present else ""
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    if cloud and "rethink/sample-credentials" in annotations:
        return Check(WARNING, f"Secret {name} has {', '.join(required)}{extra} but still the repository's sample "
                              "credentials (annotation rethink/sample-credentials): replace them before any shared "
                              "or cloud use (k8s/base/s3-secret.yaml)")  # fmt: skip
    return Check(OK, f"Secret {name} has {', '.join(required)}{extra}")


def service_account_may_report(kube: Kube, ns: str, name: str) -> Check:
    user = f"system:serviceaccount:{ns}:{name}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]
    verbs = " and ".join(EXECUTOR_VERBS)
    by_hand = " && ".join(f"kubectl auth can-i {v} workflowtaskresults.argoproj.io -n {ns} --as={user}"
                          for v in EXECUTOR_VERBS)  # fmt: skip
    try:
        kube.service_account(ns, name)
        exists, unverified = f"ServiceAccount {name} exists", False
    except ApiError as e:
        if e.code == 404:
            return Check(PROBLEM, f"ServiceAccount {name} does not exist in namespace {ns}: kubectl apply -k "
                                  "k8s/overlays/local (or cloud) creates it with its Role (k8s/base/rbac.yaml), "
                                  "or pass --service-account")  # fmt: skip
        exists, unverified = f"ServiceAccount {name} not verified ({e.code} {e.reason})", True
    try:
        denied = [
            v
            for v in EXECUTOR_VERBS
            if not kube.may(ns, user, groups, v, "argoproj.io", "workflowtaskresults")
        ]
    except ApiError as e:
        return Check(WARNING, f"{exists}; whether it may {verbs} workflowtaskresults is not verified (you may not "
                              f"ask the API: {e.code} {e.reason}): check by hand: {by_hand}")  # fmt: skip
    if denied:
        return Check(PROBLEM, f"ServiceAccount {name} may not {' and '.join(denied)} workflowtaskresults.argoproj.io "
                              f"in namespace {ns}, which Argo v4's executor in every pod does: bind it to a Role "
                              "like rethink-workflow-executor (k8s/base/rbac.yaml)")  # fmt: skip
    return Check(WARNING if unverified else OK, f"{exists} and may {verbs} workflowtaskresults")


def gpu_nodes(kube: Kube, s: rw.Settings, workflow: dict) -> list[Check]:
    """Where the training pods can go: ready nodes with allocatable GPUs that match the pods' required node
    affinity and carry no taint they do not tolerate; with --on-demand-after, also where the fallback goes."""
    train = next(t for t in workflow["spec"]["templates"] if t["name"] == "train")
    tolerations = train.get("tolerations") or []
    affinity = (train.get("affinity") or {}).get("nodeAffinity") or {}
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms")
    try:
        nodes = kube.nodes()
    except ApiError as e:
        return [Check(WARNING, f"GPU nodes not verified (you may not list nodes: {e.code} {e.reason}): check by "
                               "hand: kubectl get nodes -o custom-columns=NAME:.metadata.name,"
                               r"GPU:.status.allocatable.nvidia\.com/gpu")]  # fmt: skip
    gpu_nodes = [n for n in nodes if allocatable_gpus(n) > 0 and ready(n)]
    if not gpu_nodes:
        return [Check(PROBLEM, f"no ready node has allocatable {rw.GPU_RESOURCE}: add GPU nodes with the NVIDIA "
                               "device plugin (docs/cluster.md, 'A cloud cluster with spot GPUs'); " + SCALE_FROM_ZERO)]  # fmt: skip
    where = "the spot affinity" if terms else "the training pods"
    fix = ("label spot GPU nodes cloud.google.com/gke-spot=true (GKE) or karpenter.sh/capacity-type=spot (Karpenter)"
           if terms else "remove the taint, or add GPU nodes without it")  # fmt: skip
    checks = [
        _placement(gpu_nodes, terms, tolerations, where, fix, s.parallelism or s.profile_spec.parallelism)
    ]
    if s.on_demand_after is not None:
        checks.append(_placement(gpu_nodes, rw.node_selector_terms(rw.ON_DEMAND_AFFINITY), tolerations,
                                 f"the on-demand fallback (--on-demand-after {s.on_demand_after})",
                                 "add an on-demand GPU node pool, or drop --on-demand-after", None))  # fmt: skip
    return checks


def _placement(gpu_nodes: list[dict], terms, tolerations, where: str, fix: str, at_once: int | None) -> Check:
    matching = [n for n in gpu_nodes if matches(n, terms)]
    fits = [n for n in matching if tolerates(tolerations, n)]
    gpus = sum(map(allocatable_gpus, fits))
    of = f"{len(gpu_nodes)} ready GPU node(s) with {sum(map(allocatable_gpus, gpu_nodes))} {rw.GPU_RESOURCE}"
    if not fits and matching:
        taints = ", ".join(sorted({x for n in matching for x in untolerated(tolerations, n)}))
        return Check(PROBLEM, f"{of}, none fits {where}: the {len(matching)} that match carry a taint the pods do "
                              f"not tolerate ({taints}): remove it from the nodes the pods should use")  # fmt: skip
    if not fits:
        return Check(PROBLEM, f"{of}, none fits {where}: {fix}; {SCALE_FROM_ZERO}")
    note = (
        f"; at most {gpus} of the {at_once} training pods at once until more come"
        if at_once and gpus < at_once
        else ""
    )
    return Check(OK, f"{len(fits)} of {of} fit {where}: {gpus} GPUs{note}")


def image_pinned(s: rw.Settings) -> Check:
    image = s.image
    if s.profile == "local":
        return Check(OK, f"image {image} (local profile: loaded into the node, no registry needed)")
    name, digest = image.split("@", 1) if "@" in image else (image, "")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if not digest and tag in ("", "latest"):
        return Check(PROBLEM, f"image {image} is {':latest' if tag else 'untagged (:latest)'}: a retried pod could "
                              "run another build than its first attempt; push a fixed tag and pass --image "
                              "REGISTRY/rethink:TAG")  # fmt: skip
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        return Check(WARNING, f"image {image} names no registry: cloud nodes look for it on Docker Hub; push it "
                              "to a registry they can pull from and pass --image REGISTRY/rethink:TAG "
                              "(docs/cluster.md, step 4)")  # fmt: skip
    return Check(OK, f"image {image} is pinned")


# ---------------------------------------------------------------------------------------------- scheduling


def allocatable_gpus(node: dict) -> int:
    value = ((node.get("status") or {}).get("allocatable") or {}).get(rw.GPU_RESOURCE, "0")
    try:
        return int(value)
    except ValueError:
        return 0


def ready(node: dict) -> bool:
    """Ready and not cordoned."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def matches(node: dict, terms: list[dict] | None) -> bool:
    """Whether a node satisfies required node selector terms: any term (ORed), all of its requirements (ANDed)."""
    if not terms:
        return True
    labels = (node.get("metadata") or {}).get("labels") or {}
    fields = {"metadata.name": (node.get("metadata") or {}).get("name")}
    return any(
        (t.get("matchExpressions") or t.get("matchFields"))
        and all(_requirement(r, labels) for r in t.get("matchExpressions") or [])
        and all(_requirement(r, fields) for r in t.get("matchFields") or [])
        for t in terms
    )


def _requirement(r: dict, labels: dict) -> bool:
    key, op, values = r["key"], r["operator"], r.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        try:
            have, bound = int(labels[key]), int(values[0])
        except (KeyError, IndexError, ValueError):
            return False
        return have > bound if op == "Gt" else have < bound
    raise ValueError(f"unknown node selector operator {op!r}")


def untolerated(tolerations: list[dict], node: dict) -> list[str]:
    """The node's taints that keep these pods off it (NoSchedule, NoExecute) and that no toleration covers."""
    taints = [
        t
        for t in (node.get("spec") or {}).get("taints") or []
        if t.get("effect") in ("NoSchedule", "NoExecute")
    ]
    return [f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in taints
            if not any(_tolerates(tol, t) for tol in tolerations)]  # fmt: skip


def tolerates(tolerations: list[dict], node: dict) -> bool:
    return not untolerated(tolerations, node)


def _tolerates(tol: dict, taint: dict) -> bool:
    if tol.get("effect") and tol["effect"] != taint.get("effect"):
        return False
    if tol.get("operator") == "Exists":
        return not tol.get("key") or tol["key"] == taint["key"]
    return tol.get("key") == taint["key"] and (tol.get("value") or "") == (taint.get("value") or "")

"""A tiny Kubernetes API server on 127.0.0.1 for the tests: the endpoints workflows/ calls, answering JSON as
a real API server does (Status objects with code, reason and message for every error), and a kubeconfig
pointing at it (plain http, a bearer token).

Its state is plain data a test edits to plant a problem: drop the namespace, a Secret key or the
ServiceAccount, deny or forbid the access reviews, change the nodes, uninstall the CRD, forbid a path.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import yaml

from tests.workflows.local_http import LocalHTTPServer

TOKEN = "fake-kube-token"
USER = "alice@example.com"
NAMESPACE = "rethink"
CREATED_NAME = "rethink-fig2b-k8s7q"


def node(name: str, labels: dict | None = None, gpus: int = 1, taints: list | None = None, ready: bool = True,
         cordoned: bool = False) -> dict:  # fmt: skip
    """A Node object as `kubectl get node -o json` shows the parts the preflight reads."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {**({"taints": taints} if taints else {}), **({"unschedulable": True} if cordoned else {})},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


GKE_SPOT = {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-nodepool": "gpu-spot"}
GKE_ON_DEMAND = {"cloud.google.com/gke-nodepool": "gpu-on-demand"}
KARPENTER_SPOT = {"karpenter.sh/capacity-type": "spot"}
KARPENTER_ON_DEMAND = {"karpenter.sh/capacity-type": "on-demand"}
GKE_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GKE_SPOT_TAINT = {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, **({"details": details} if details is not None else {}), "code": code}  # fmt: skip


def not_found(kind: str, name: str, group: str = "") -> dict:
    resource = f"{kind}.{group}" if group else kind
    return status(404, "NotFound", f'{resource} "{name}" not found',
                  {"name": name, **({"group": group} if group else {}), "kind": kind})  # fmt: skip


def forbidden(verb: str, resource: str, group: str, namespace: str | None) -> dict:
    where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    full = f"{resource}.{group}" if group else resource
    return status(403, "Forbidden",
                  f'{full} is forbidden: User "{USER}" cannot {verb} resource "{resource}" in API group "{group}"{where}',
                  {"group": group, "kind": resource})  # fmt: skip


def attributes(method: str, path: str) -> tuple[str, str, str, str | None, str | None]:
    """(verb, API group, resource, name, namespace) of a resource request, as the API server's authorizer
    sees it; ("", "", "", None, None) for a non-resource path such as the discovery of a group."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if not rest:
        return "", "", "", None, None
    namespaced = rest[0] == "namespaces" and len(rest) >= 3
    namespace, rest = (rest[1], rest[2:]) if namespaced else (None, rest)
    name = rest[1] if len(rest) >= 2 else None
    verb = "create" if method == "POST" else "get" if name else "list"
    return verb, group, rest[0], name, namespace


class FakeKube(LocalHTTPServer):
    """The API server; `requests` records (method, path, body) of every call it answered."""

    def __init__(self):
        self.namespaces = {NAMESPACE}
        self.secrets = {(NAMESPACE, "rethink-s3"): {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "secret",
                                                    "AWS_ENDPOINT_URL": "http://minio:9000"}}  # fmt: skip
        self.secret_annotations: dict[tuple[str, str], dict] = {}
        self.service_accounts = {(NAMESPACE, "rethink-workflow")}
        self.allowed = {(f"system:serviceaccount:{NAMESPACE}:rethink-workflow", v, "workflowtaskresults")
                        for v in ("create", "patch")}  # fmt: skip
        self.nodes = [node("cpu-1", gpus=0), node("gpu-spot-1", GKE_SPOT, gpus=2, taints=[GKE_GPU_TAINT, GKE_SPOT_TAINT]),
                      node("gpu-spot-2", KARPENTER_SPOT, gpus=1), node("gpu-od-1", GKE_ON_DEMAND, taints=[GKE_GPU_TAINT])]  # fmt: skip
        self.crd_installed = True
        self.forbidden: set[tuple[str, str]] = set()  # (method, path regex) answered 403
        self.workflows: dict[tuple[str, str], list[dict]] = {}  # (ns, name) -> snapshots, served in turn
        self.then = None  # created workflow -> the snapshots that follow it (the controller's work), if set
        self.requests: list[tuple[str, str, dict | None]] = []
        self.headers: list[dict] = []  # each request's, names in lower case
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

            def log_message(self, *args):
                pass

        self.serve(Handler)

    def kubeconfig(self, directory: Path, token: str = TOKEN, context: str = "fake") -> Path:
        """A kubeconfig file for this server (context `context`, also the current one)."""
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context, "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "alice", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "alice", "namespace": NAMESPACE}}],
        }))  # fmt: skip
        return path

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method in (None, m)]

    # -------------------------------------------------------------------------------------------- routing

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        with self._lock:
            self.requests.append((method, path, body))
            self.headers.append({k.lower(): v for k, v in h.headers.items()})
            code, answer = self._answer(h, method, path, body)
        data = json.dumps(answer).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, h, method: str, path: str, body) -> tuple[int, dict]:
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        for m, pattern in self.forbidden:
            if m == method and re.fullmatch(pattern, path):
                return 403, self._forbidden(method, path)
        routes = [
            ("GET", r"/api/v1/namespaces/([^/]+)", self._namespace),
            ("GET", r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", self._secret),
            ("GET", r"/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)", self._service_account),
            ("GET", r"/api/v1/nodes", self._nodes),
            (
                "POST",
                r"/apis/authorization.k8s.io/v1/namespaces/([^/]+)/localsubjectaccessreviews",
                self._review,
            ),
            ("GET", r"/apis/argoproj.io/v1alpha1", self._discovery),
            ("POST", r"/apis/argoproj.io/v1alpha1/namespaces/([^/]+)/workflows", self._create_workflow),
            ("GET", r"/apis/argoproj.io/v1alpha1/namespaces/([^/]+)/workflows/([^/]+)", self._get_workflow),
        ]
        for m, pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return answer(*match.groups(), body=body) if method == "POST" else answer(*match.groups())
        return 404, status(404, "NotFound", "the server could not find the requested resource", {})

    def _forbidden(self, method: str, path: str) -> dict:
        verb, group, resource, _, namespace = attributes(method, path)
        return forbidden(verb, resource, group, namespace)

    def _namespace(self, ns):
        if ns not in self.namespaces:
            return 404, not_found("namespaces", ns)
        return 200, {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns},
            "status": {"phase": "Active"},
        }

    def _secret(self, ns, name):
        if (ns, name) not in self.secrets:
            return 404, not_found("secrets", name)
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[(ns, name)].items()}
        meta = {
            "name": name,
            "namespace": ns,
            **({"annotations": a} if (a := self.secret_annotations.get((ns, name))) else {}),
        }
        return 200, {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data}

    def _service_account(self, ns, name):
        if (ns, name) not in self.service_accounts:
            return 404, not_found("serviceaccounts", name)
        return 200, {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns},
        }

    def _nodes(self):
        return 200, {
            "apiVersion": "v1",
            "kind": "NodeList",
            "metadata": {"resourceVersion": "1"},
            "items": self.nodes,
        }

    def _review(self, ns, body):
        spec = body["spec"]
        attrs = spec["resourceAttributes"]
        assert attrs["namespace"] == ns and body["kind"] == "LocalSubjectAccessReview", body
        allowed = (spec["user"], attrs["verb"], attrs["resource"]) in self.allowed and attrs[
            "group"
        ] == "argoproj.io"
        return 201, {
            **body,
            "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC policy matched"})},
        }

    def _discovery(self):
        if not self.crd_installed:
            return 404, status(404, "NotFound", "the server could not find the requested resource", {})
        resources = [{"name": n, "singularName": n[:-1], "namespaced": True, "kind": k, "verbs": ["create", "get"]}
                     for n, k in (("workflows", "Workflow"), ("workflowtaskresults", "WorkflowTaskResult"))]  # fmt: skip
        return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "argoproj.io/v1alpha1",
                     "resources": resources}  # fmt: skip

    def _create_workflow(self, ns, body):
        if not self.crd_installed:
            return 404, status(404, "NotFound", "the server could not find the requested resource", {})
        if ns not in self.namespaces:
            return 404, not_found("namespaces", ns)
        created = copy.deepcopy(body)
        created["metadata"] = {
            **created["metadata"],
            "name": CREATED_NAME,
            "uid": "0b7c",
            "resourceVersion": "7",
        }
        created.pop("status", None)
        self.workflows[(ns, CREATED_NAME)] = [
            created,
            *(self.then(copy.deepcopy(created)) if self.then else []),
        ]
        return 201, created

    def _get_workflow(self, ns, name):
        if not self.crd_installed:
            return 404, status(404, "NotFound", "the server could not find the requested resource", {})
        snapshots = self.workflows.get((ns, name))
        if not snapshots:
            return 404, not_found("workflows", name, "argoproj.io")
        return 200, snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]

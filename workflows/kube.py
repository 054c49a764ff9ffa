"""The Kubernetes API as workflows/ uses it, through the official `kubernetes` client: a client from the
kubeconfig (or, inside a pod, its service account), calls that return plain JSON, and failures as one line.

Submitting this way creates the Workflow object directly, as `argo submit` does without an Argo Server; the
workflow controller picks it up. Every call answers a dict (the API's JSON, no client models) or raises
`ApiError` (the API server's Status: code, reason, message) or, when the API cannot be used at all
(unreachable, TLS, credentials rejected), `ClusterError` with what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from workflows.cluster import ClusterError, one_line

ARGO_GROUP, ARGO_VERSION = "argoproj.io", "v1alpha1"
REQUEST_TIMEOUT = 30  # seconds, for every call
DEFAULT_KUBECONFIG = "~/.kube/config"
LOGIN_HINT = ("log in again or refresh the kubeconfig (GKE: gcloud container clusters get-credentials; "
              "EKS: aws eks update-kubeconfig; kind: kind export kubeconfig)")  # fmt: skip


@dataclass
class ApiError(Exception):
    """The API server refused a call; its Status object's code, reason, message and details."""

    code: int
    reason: str = ""
    message: str = ""
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}" if self.message else f"{self.code} {self.reason}"


def kubeconfig_paths(kubeconfig: str | None = None) -> tuple[str, list[str]]:
    """What to read (--kubeconfig, else $KUBECONFIG, a list like PATH, else ~/.kube/config), and which exist."""
    spec = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    paths = [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
    return spec, [p for p in paths if os.path.isfile(p)]


def connect(kubeconfig: str | None = None, context: str | None = None) -> Kube:
    """A client for the kubeconfig's context (its current one by default); inside a pod without a kubeconfig,
    for the pod's service account. ClusterError when there is neither or the context is not there."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    spec, existing = kubeconfig_paths(kubeconfig)
    cfg = client.Configuration()
    if not existing:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException as e:
                raise ClusterError(
                    f"cannot use this pod's service account for the Kubernetes API: {one_line(e)}"
                ) from e
            return Kube(
                client.ApiClient(cfg), f"the Kubernetes API at {cfg.host} (this pod's service account)"
            )
        raise ClusterError(
            f"no kubeconfig at {spec} (and not inside a cluster): point --kubeconfig or KUBECONFIG at one "
            "(kind and minikube write ~/.kube/config), or pass --argo-server URL to go through an Argo Server"
        )
    names, current = [], None
    for path in existing:
        try:
            doc = yaml.safe_load(open(path, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ClusterError(f"cannot read the kubeconfig {path}: {one_line(e)}") from e
        if not isinstance(doc, dict):
            raise ClusterError(f"the kubeconfig {path} is not a kubeconfig (no mapping at its top)")
        names += [c.get("name") for c in doc.get("contexts") or [] if isinstance(c, dict)]
        current = current or doc.get("current-context")  # the first file that sets it wins, as for kubectl
    name = context or current
    if not name:
        raise ClusterError(f"the kubeconfig {spec} sets no current context: pass --context "
                           f"(one of: {', '.join(map(str, names)) or 'none, it has no contexts'})")  # fmt: skip
    if name not in names:
        raise ClusterError(f"no context {name!r} in the kubeconfig {spec} (it has: "
                           f"{', '.join(map(str, names)) or 'none'}): pass --context NAME "
                           "(kubectl config get-contexts lists them)")  # fmt: skip
    try:
        config.load_kube_config(config_file=os.pathsep.join(existing), context=name, client_configuration=cfg,
                                persist_config=False)  # fmt: skip
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"cannot use context {name} of the kubeconfig {spec}: {one_line(e)}") from e
    if not cfg.verify_ssl:  # the kubeconfig says insecure-skip-tls-verify: its choice, not a warning per call
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return Kube(client.ApiClient(cfg), f"the Kubernetes API at {cfg.host} (context {name})")


class Kube:
    """The calls workflows/ makes, each returning the API's JSON as a dict."""

    def __init__(self, api_client, where: str):
        self.api_client = api_client
        self.where = where
        self.host = api_client.configuration.host

    # -------------------------------------------------------------------------------------------- reads

    def api_resources(self, group: str = ARGO_GROUP, version: str = ARGO_VERSION) -> dict:
        """The discovery document of an API group version (404: the group's CRDs are not installed)."""
        from kubernetes import client

        return self._call(client.CustomObjectsApi(self.api_client).get_api_resources, group, version)

    def namespace(self, name: str) -> dict:
        from kubernetes import client

        return self._call(client.CoreV1Api(self.api_client).read_namespace, name)

    def secret(self, namespace: str, name: str) -> dict:
        from kubernetes import client

        return self._call(client.CoreV1Api(self.api_client).read_namespaced_secret, name, namespace)

    def service_account(self, namespace: str, name: str) -> dict:
        from kubernetes import client

        return self._call(client.CoreV1Api(self.api_client).read_namespaced_service_account, name, namespace)

    def nodes(self) -> list[dict]:
        """Every node, page by page."""
        from kubernetes import client

        api, items, token = client.CoreV1Api(self.api_client), [], None
        while True:
            page = self._call(api.list_node, limit=500, **({"_continue": token} if token else {}))
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def may(self, namespace: str, user: str, groups: list[str], verb: str, group: str, resource: str) -> bool:
        """Whether `user` may `verb` `resource`.`group` in `namespace` (a LocalSubjectAccessReview)."""
        from kubernetes import client

        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "LocalSubjectAccessReview",
            "metadata": {"namespace": namespace},
            "spec": {
                "user": user,
                "groups": groups,
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                },
            },
        }
        api = client.AuthorizationV1Api(self.api_client)
        answer = self._call(api.create_namespaced_local_subject_access_review, namespace, review)
        return bool((answer.get("status") or {}).get("allowed"))

    # -------------------------------------------------------------------------------------------- workflows

    def create_workflow(self, namespace: str, workflow: dict) -> dict:
        from kubernetes import client

        api = client.CustomObjectsApi(self.api_client)
        return self._call(api.create_namespaced_custom_object, ARGO_GROUP, ARGO_VERSION, namespace, "workflows",
                          workflow)  # fmt: skip

    def get_workflow(self, namespace: str, name: str) -> dict:
        from kubernetes import client

        api = client.CustomObjectsApi(self.api_client)
        return self._call(
            api.get_namespaced_custom_object, ARGO_GROUP, ARGO_VERSION, namespace, "workflows", name
        )

    # -------------------------------------------------------------------------------------------- plumbing

    def _call(self, method, *args, **kwargs) -> dict:
        import urllib3
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config.config_exception import ConfigException

        try:
            response = method(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if not e.status:  # the client's own wrapping of a TLS failure
                raise ClusterError(f"TLS to {self.where} failed ({one_line(e.reason)}): check the kubeconfig's "
                                   "certificate-authority for this cluster") from e  # fmt: skip
            error = _api_error(e.status, e.reason, e.body)
            if error.code == 401:
                raise ClusterError(
                    f"{self.where} rejected the credentials (401 Unauthorized): {LOGIN_HINT}"
                ) from e
            raise error from e
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.SSLError):
                raise ClusterError(f"TLS to {self.where} failed ({one_line(e.reason)}): check the kubeconfig's "
                                   "certificate-authority for this cluster") from e  # fmt: skip
            raise ClusterError(f"cannot reach {self.where} ({_reason(e)}): is the cluster running? "
                               "(kubectl cluster-info)") from e  # fmt: skip
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(f"cannot reach {self.where} ({_reason(e)}): is the cluster running? "
                               "(kubectl cluster-info)") from e  # fmt: skip
        except ConfigException as e:  # an exec credential plugin failing to refresh the token
            raise ClusterError(f"cannot get credentials for {self.where}: {one_line(e)}; {LOGIN_HINT}") from e
        try:
            return json.loads(response.data or b"{}")
        except ValueError as e:
            raise ClusterError(
                f"{self.where} answered something that is not JSON: {one_line(response.data[:200])}"
            ) from e


def _api_error(code: int, reason: str | None, body) -> ApiError:
    """The Status object of an error answer (or its text, when the server sent no JSON)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        status = json.loads(body or "")
    except ValueError:
        status = None
    if isinstance(status, dict):
        return ApiError(code=int(status.get("code") or code), reason=status.get("reason") or reason or "",
                        message=one_line(status.get("message") or ""), details=status.get("details") or {})  # fmt: skip
    return ApiError(code=code, reason=reason or "", message=one_line(body or ""))


def _reason(e: Exception) -> str:
    """The innermost cause of a urllib3 error, short (e.g. '[Errno 111] Connection refused')."""
    inner = getattr(e, "reason", None) or e
    return one_line(str(inner).rsplit(": ", 1)[-1], 200) or type(e).__name__


class KubeSubmitter:
    """Submission through the Kubernetes API: the Workflow object created in the namespace, read back by name."""

    def __init__(self, kube: Kube, namespace: str):
        self.kube, self.namespace = kube, namespace
        self.where = kube.where

    def create(self, workflow: dict) -> str:
        try:
            created = self.kube.create_workflow(self.namespace, workflow)
        except ApiError as e:
            raise ClusterError(self._refused("create workflows in", e)) from e
        return created["metadata"]["name"]

    def get(self, name: str) -> dict:
        try:
            return self.kube.get_workflow(self.namespace, name)
        except ApiError as e:
            if e.code == 404 and (e.details.get("kind") == "workflows" or e.details.get("name") == name):
                raise ClusterError(f"no workflow {name} in namespace {self.namespace} ({self.where}): "
                                   f"kubectl -n {self.namespace} get workflows lists them") from e  # fmt: skip
            raise ClusterError(self._refused("read workflows in", e)) from e

    def _refused(self, doing: str, e: ApiError) -> str:
        ns = self.namespace
        if e.code == 403:
            return (
                f"{self.where} does not let you {doing} namespace {ns} (403 Forbidden: {e.message}): ask for "
                "a Role with create, get on workflows.argoproj.io there (k8s/base/rbac.yaml: rethink-submitter)"
            )
        if e.code == 404 and (e.details.get("kind") == "namespaces" or e.message.startswith("namespaces ")):
            return (
                f"namespace {ns} does not exist ({self.where}): create it with kubectl apply -k "
                "k8s/overlays/local (or cloud), or pass --namespace"
            )
        if e.code == 404:
            return (
                f"the Workflow CRD (workflows.argoproj.io) is not installed in the cluster behind {self.where}: "
                "install Argo Workflows (docs/cluster.md, step 2)"
            )
        return f"{self.where} refused to {doing.split()[0]} the workflow ({e})"

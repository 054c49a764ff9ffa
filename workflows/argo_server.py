"""Submission through an Argo Server's REST API (--argo-server / ARGO_SERVER, with --token / ARGO_TOKEN), for
clusters reached through a port-forward or an ingress rather than a kubeconfig. The server validates the
workflow and creates it with the token's rights (client auth mode)."""

from __future__ import annotations

from workflows.cluster import ClusterError, one_line

REQUEST_TIMEOUT = 30  # seconds, for every request


class ArgoServer:
    """POST /api/v1/workflows/NS to create, GET /api/v1/workflows/NS/NAME to read back."""

    def __init__(self, url: str, namespace: str, token: str | None = None, insecure: bool = False):
        import requests

        if not url.startswith(("http://", "https://")):
            raise ClusterError(f"--argo-server {url!r} must be an http:// or https:// URL")
        self.url, self.namespace, self.insecure = url.rstrip("/"), namespace, insecure
        self.where = f"the Argo Server at {url}"
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        if token:  # ARGO_TOKEN is often written as "Bearer ...", as the argo CLI takes it
            self.session.headers["Authorization"] = (
                token if token.startswith("Bearer ") else f"Bearer {token}"
            )
        self.session.verify = not insecure
        if insecure:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def create(self, workflow: dict) -> str:
        created = self._request("POST", f"/api/v1/workflows/{self.namespace}",
                                {"namespace": self.namespace, "workflow": workflow}, "refused the workflow")  # fmt: skip
        return created["metadata"]["name"]

    def get(self, name: str) -> dict:
        return self._request("GET", f"/api/v1/workflows/{self.namespace}/{name}", None,
                             f"could not read workflow {name} in namespace {self.namespace}")  # fmt: skip

    def _request(self, method: str, path: str, body: dict | None, refused: str) -> dict:
        import requests

        try:
            r = self.session.request(method, self.url + path, json=body, timeout=REQUEST_TIMEOUT)
        except requests.exceptions.SSLError as e:
            raise ClusterError(f"TLS to {self.where} failed ({_reason(e)}); for a port-forwarded server with a "
                               "self-signed certificate pass --insecure") from e  # fmt: skip
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ClusterError(f"cannot reach {self.where} ({_reason(e)}); start a port-forward (kubectl -n argo "
                               "port-forward svc/argo-server 2746:2746) or set --argo-server/ARGO_SERVER") from e  # fmt: skip
        if r.status_code in (401, 403):
            word = "unauthorized" if r.status_code == 401 else "forbidden"
            raise ClusterError(f"{self.where} rejected the token ({r.status_code} {word}) for namespace "
                               f"{self.namespace}: set --token/ARGO_TOKEN to a token allowed to create and get "
                               "workflows there (docs/cluster.md: kubectl create token)")  # fmt: skip
        if r.status_code == 404 and method == "GET":
            raise ClusterError(f"no workflow {path.rsplit('/', 1)[-1]} in namespace {self.namespace} "
                               f"({self.where}): argo list -n {self.namespace} lists them")  # fmt: skip
        if not r.ok:
            raise ClusterError(f"{self.where} {refused}: {r.status_code} {_message(r)}")
        try:
            return r.json()
        except ValueError as e:
            raise ClusterError(
                f"{self.where} answered something that is not JSON: {one_line(r.text[:200])}"
            ) from e


def _message(r) -> str:
    """Argo's error body is a gRPC status as JSON ({"code": 3, "message": "..."}); otherwise the text."""
    try:
        return one_line(r.json().get("message") or r.text)
    except (ValueError, AttributeError):
        return one_line(r.text or r.reason)


def _reason(e: Exception) -> str:
    """The innermost cause of a requests error, short and on one line (e.g. '[Errno 111] Connection refused')."""
    inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
    text = " ".join(str(getattr(inner, "reason", None) or inner).split())
    return text.rsplit(": ", 1)[-1][:200] or type(e).__name__

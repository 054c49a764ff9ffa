"""Every workflows test starts with no cluster configured: no Argo Server, no kubeconfig (KUBECONFIG points at
a file that does not exist), not inside a pod, no proxy between the client and the fakes on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.workflows.fake_kube import FakeKube


@pytest.fixture(autouse=True)
def no_cluster_environment(monkeypatch, tmp_path):
    for key in ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_INSECURE_SKIP_VERIFY", "KUBERNETES_SERVICE_HOST",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


@pytest.fixture
def kube():
    """The fake Kubernetes API server, running."""
    with FakeKube() as fake:
        yield fake


@pytest.fixture
def kubeconfig(kube, tmp_path, monkeypatch):
    """A kubeconfig for the fake, as KUBECONFIG."""
    path = kube.kubeconfig(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path

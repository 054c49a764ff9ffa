"""Submission through the Kubernetes API (no Argo Server) against a fake API server on 127.0.0.1: what is
created, with which credentials, and one clear line for each way it can fail (no kubeconfig, no such context,
401, 403, the Workflow CRD not installed, the namespace missing, the API unreachable)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.workflows.fake_kube import CREATED_NAME, TOKEN, USER, FakeKube
from workflows import builder as rw
from workflows import submit

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--suite", "fig2b", "--profile", "local", "--synthetic"]
WORKFLOWS = "/apis/argoproj.io/v1alpha1/namespaces/{ns}/workflows"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit.py: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_creates_the_workflow_object_with_the_kubeconfig(kube, kubeconfig, capsys):
    assert submit.main(ARGS) == 0
    out = capsys.readouterr().out
    creates = [(p, body) for m, p, body in kube.requests if m == "POST" and p.endswith("/workflows")]
    assert [p for p, _ in creates] == [WORKFLOWS.format(ns="rethink")]
    expected = rw.build_workflow(rw.Settings(suite="fig2b", profile="local", synthetic=True)).to_dict()
    assert creates[0][1] == expected  # the Workflow object itself, apiVersion and kind included
    assert {h.get("authorization") for h in kube.headers} == {f"Bearer {TOKEN}"}
    assert (
        f"submitted workflow {CREATED_NAME} in namespace rethink through the Kubernetes API at {kube.url}"
        in out
    )
    assert "(context fake)" in out
    assert f"python workflows/submit.py status {CREATED_NAME} --watch" in out
    assert kube.paths()[0] == "/apis/argoproj.io/v1alpha1"  # the preflight ran first


def test_kubeconfig_flag_context_and_namespace(kube, tmp_path, capsys):
    config = kube.kubeconfig(tmp_path, context="kind-rethink")
    kube.namespaces.add("team")
    args = [
        *ARGS,
        "--kubeconfig",
        str(config),
        "--context",
        "kind-rethink",
        "--namespace",
        "team",
        "--skip-preflight",
    ]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert kube.paths() == [WORKFLOWS.format(ns="team")]  # --skip-preflight: nothing but the creation
    assert "(context kind-rethink)" in out and "--namespace team" in out


def test_no_kubeconfig_is_one_line(capsys):
    assert submit.main(ARGS) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no kubeconfig at" in line and "--kubeconfig" in line and "--argo-server" in line


def test_no_such_context_is_one_line(kube, kubeconfig, capsys):
    assert submit.main([*ARGS, "--context", "prod"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no context 'prod'" in line and "(it has: fake)" in line
    assert kube.requests == []


def test_rejected_credentials_401_is_one_line(kube, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path, token="expired")))
    assert submit.main(ARGS) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "rejected the credentials (401 Unauthorized)" in line and "log in again" in line


def test_forbidden_403_is_one_line_naming_the_user(kube, kubeconfig, capsys):
    kube.forbidden.add(("POST", WORKFLOWS.format(ns="rethink")))
    assert submit.main(ARGS) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "does not let you create workflows in namespace rethink (403 Forbidden" in line
    assert USER in line and "rethink-submitter" in line


def test_missing_crd_is_one_line(kube, kubeconfig, capsys):
    kube.crd_installed = False
    assert submit.main([*ARGS, "--skip-preflight"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "the Workflow CRD (workflows.argoproj.io) is not installed" in line and "Argo Workflows" in line


def test_missing_namespace_is_one_line(kube, kubeconfig, capsys):
    assert submit.main([*ARGS, "--skip-preflight", "--namespace", "nowhere"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "namespace nowhere does not exist" in line and "kubectl apply -k" in line


def test_status_of_an_unknown_workflow_is_one_line(kube, kubeconfig, capsys):
    assert submit.main(["status", "rethink-full-nope"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no workflow rethink-full-nope in namespace rethink" in line


def test_unreadable_kubeconfig_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "kubeconfig"
    config.write_text("clusters: [unclosed\n")
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert submit.main(ARGS) == 1
    assert f"cannot read the kubeconfig {config}" in one_error_line(capsys.readouterr().err)


def test_unreachable_api_is_one_line_without_traceback(tmp_path):
    """As a user runs it: a subprocess, its whole stderr one line."""
    with FakeKube() as fake:  # its port, closed once it stops
        config = fake.kubeconfig(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(config)}
    out = subprocess.run([sys.executable, str(ROOT / "workflows/submit.py"), *ARGS], capture_output=True, text=True,
                         timeout=120, env=env)  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    line = one_error_line(out.stderr)
    assert (
        f"cannot reach the Kubernetes API at {fake.url} (context fake)" in line
        and "Connection refused" in line
    )


def test_inside_a_pod_without_a_kubeconfig_its_service_account(kube, monkeypatch, capsys):
    """The in-cluster config (a pod's token and the service's address), as kubernetes.config loads it."""
    from kubernetes import config

    def in_cluster(client_configuration):
        client_configuration.host = kube.url
        client_configuration.api_key = {"authorization": f"Bearer {TOKEN}"}

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setattr(config, "load_incluster_config", in_cluster)
    assert submit.main([*ARGS, "--skip-preflight"]) == 0
    assert "(this pod's service account)" in capsys.readouterr().out
    assert kube.paths() == [WORKFLOWS.format(ns="rethink")]


def test_the_cluster_side_imports_no_torch():
    modules = "workflows.kube, workflows.argo_server, workflows.preflight, workflows.watch, workflows.submit"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_full_on_spot_runs_its_preflight_and_submits(kube, kubeconfig, capsys):
    """The issue's done criterion: `submit.py --suite full --profile spot` with a kubeconfig."""
    assert submit.main(["--suite", "full", "--profile", "spot"]) == 0
    out = capsys.readouterr().out
    assert "preflight: ready, 1 warning" in out  # rethink:dev names no registry
    (body,) = [b for m, p, b in kube.requests if m == "POST" and p.endswith("/workflows")]
    assert body == rw.build_workflow(rw.Settings(suite="full", profile="spot")).to_dict()
    assert f"submitted workflow {CREATED_NAME}" in out

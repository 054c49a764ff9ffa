"""Kubernetes manifests and the image, validated without a cluster or Docker: kustomize output against the
Kubernetes schemas (strict), the RBAC the Argo v4 executor needs, pinned images, hadolint, the image lock."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflows import builder as rw

ROOT = Path(__file__).resolve().parents[2]

KUSTOMIZATIONS = ["k8s", "k8s/overlays/local", "k8s/overlays/cloud"]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"`{name}` is not installed")
    return path


def kustomize(directory: str) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(ROOT / directory)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_output_validates_strictly(directory, tmp_path):
    docs = kustomize(directory)
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert {d["metadata"].get("namespace", "rethink") for d in docs} == {"rethink"}


def test_strict_validation_catches_a_typo(tmp_path):
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 1}], "selectr": {"a": "b"}}}  # fmt: skip
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0


def test_base_has_what_the_workflow_needs():
    docs = kustomize("k8s")
    assert "rethink" in by_kind(docs, "Namespace")
    assert rw.DEFAULT_SERVICE_ACCOUNT in by_kind(docs, "ServiceAccount")
    # The Argo v4 executor records step outcomes as WorkflowTaskResults: create and patch, nothing more.
    roles = by_kind(docs, "Role")
    bindings = [b for b in by_kind(docs, "RoleBinding").values()
                if any(s["kind"] == "ServiceAccount" and s["name"] == rw.DEFAULT_SERVICE_ACCOUNT
                       and s.get("namespace", "rethink") == "rethink" for s in b["subjects"])]  # fmt: skip
    assert len(bindings) == 1
    rules = roles[bindings[0]["roleRef"]["name"]]["rules"]
    assert rules == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]

    secret = by_kind(docs, "Secret")[rw.DEFAULT_S3_SECRET]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(secret["stringData"])
    assert "sample" in secret["metadata"]["annotations"]["rethink/sample-credentials"]
    assert "SAMPLE CREDENTIALS ONLY" in (ROOT / "k8s/base/s3-secret.yaml").read_text()

    assert "minio-data" in by_kind(docs, "PersistentVolumeClaim")
    assert "minio" in by_kind(docs, "Service") and "minio" in by_kind(docs, "Deployment")
    job = by_kind(docs, "Job")["create-bucket"]
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    bucket = rw.DEFAULT_STORE.removeprefix("s3://").split("/")[0]
    assert mc["args"][-1].endswith("/" + bucket)


def test_images_are_pinned():
    for directory in KUSTOMIZATIONS:
        for doc in kustomize(directory):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = c["image"].rpartition(":")
                assert name and tag and tag != "latest", c["image"]
                assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), c[
                    "image"
                ]  # MinIO releases


def test_overlays_differ_where_profiles_do():
    def storage(d):
        return by_kind(kustomize(d), "PersistentVolumeClaim")["minio-data"]["spec"]["resources"]["requests"][
            "storage"
        ]

    assert storage("k8s/overlays/local") == "5Gi"
    assert storage("k8s/overlays/cloud") == "200Gi"


def test_kind_cluster_config_is_not_a_resource():
    config = yaml.safe_load((ROOT / "k8s/kind-cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    listed = yaml.safe_load((ROOT / "k8s/kustomization.yaml").read_text())["resources"]
    assert "kind-cluster.yaml" not in listed


# ---------------------------------------------------------------------------------------------- image


def test_hadolint_is_clean():
    out = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    # One stage, its base a build argument defaulting to the pinned CUDA image (k8s/local builds a CPU one).
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["${BASE_IMAGE}"]
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base), base
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user == str(rw.IMAGE_UID)  # numeric, so runAsNonRoot can verify it; the workflow runs pods as it
    assert re.search(r'^ENTRYPOINT \["rethink"\]', text, re.M)
    # Cache-friendly: the locked dependencies are installed before the source is copied.
    assert text.index("requirements/image.lock") < text.index("COPY rethink")


def test_image_lock_pins_every_runtime_dependency_but_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "requirements/image.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"unpinned: {line}"
            pins[name.lower()] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        if dep.name in ("torch", "torchvision"):
            assert dep.name not in pins  # from the base image, with its CUDA build
        else:
            assert dep.name.lower() in pins, f"{dep.name} is not pinned in requirements/image.lock"
            assert dep.specifier.contains(pins[dep.name.lower()]), (dep, pins[dep.name.lower()])


def test_dockerignore_keeps_the_context_small():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"  # an allow-list
    for needed in ("pyproject.toml", "README.md", "requirements/image.lock", "rethink/"):
        assert f"!{needed}" in lines


def test_the_submitter_may_do_all_that_submit_py_does(tmp_path, capsys):
    """Every call of a preflight, a submission and a status read through the Kubernetes API (recorded by the
    fake API server), checked against the RBAC rules bound to the rethink-submitter ServiceAccount."""
    from tests.workflows.fake_kube import FakeKube, attributes
    from workflows import submit

    docs = kustomize("k8s")
    rules = []
    for kind, role_kind in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        for binding in by_kind(docs, kind).values():
            if any(
                s["kind"] == "ServiceAccount" and s["name"] == "rethink-submitter"
                for s in binding["subjects"]
            ):
                rules += by_kind(docs, role_kind)[binding["roleRef"]["name"]]["rules"]

    def allowed(verb, group, resource, name):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and (not r.get("resourceNames") or name in r["resourceNames"]) for r in rules)  # fmt: skip

    with FakeKube() as fake:
        config = str(fake.kubeconfig(tmp_path))
        args = [
            "--suite",
            "fig2b",
            "--profile",
            "spot",
            "--image",
            "registry.example.com/rethink:1",
            "--kubeconfig",
            config,
        ]
        assert submit.main(args) == 0
        assert submit.main(["status", "rethink-fig2b-k8s7q", "--kubeconfig", config]) == 0
    capsys.readouterr()
    calls = {attributes(m, p) for m, p, _ in fake.requests} - {("", "", "", None, None)}  # discovery: anyone
    assert {c[2] for c in calls} == {"namespaces", "secrets", "serviceaccounts", "localsubjectaccessreviews", "nodes",
                                     "workflows"}  # fmt: skip
    denied = [c for c in calls if not allowed(*c[:4])]
    assert not denied, f"the rethink-submitter may not: {denied}"

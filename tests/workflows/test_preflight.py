"""The preflight against the fake Kubernetes API with each problem planted: it is named as a PROBLEM with what
to do, and stops the submission unless --skip-preflight; what cannot be verified (403) is a warning with the
kubectl command to check it by hand; what is checked comes from the rendered workflow."""

from __future__ import annotations

import pytest

from tests.workflows.fake_kube import (
    GKE_GPU_TAINT,
    GKE_ON_DEMAND,
    GKE_SPOT,
    KARPENTER_ON_DEMAND,
    KARPENTER_SPOT,
    node,
)
from workflows import builder as rw
from workflows import preflight, submit

IMAGE = "registry.example.com/rethink:0.1.0"
SPOT = ["--suite", "fig2b", "--profile", "spot", "--image", IMAGE]
LOCAL = ["--suite", "fig2b", "--profile", "local", "--synthetic"]


def checks_of(capsys) -> list[tuple[str, str]]:
    """(status, message) of each check line submit.py printed."""
    out = capsys.readouterr().out
    return [(line.split()[0], line.strip()) for line in out.splitlines() if line.startswith("  ") and
            line.split()[0] in (preflight.OK, preflight.PROBLEM, preflight.WARNING)]  # fmt: skip


def only(checks, status: str) -> list[str]:
    return [message for s, message in checks if s == status]


def created(kube) -> bool:
    return any(m == "POST" and p.endswith("/workflows") for m, p, _ in kube.requests)


def test_a_ready_cluster_passes_and_preflight_only_submits_nothing(kube, kubeconfig, capsys):
    assert submit.main([*SPOT, "--on-demand-after", "3", "--preflight-only"]) == 0
    checks = checks_of(capsys)
    assert only(checks, preflight.PROBLEM) == only(checks, preflight.WARNING) == []
    assert len(checks) == 7  # argo, namespace, secret, service account, spot nodes, on-demand nodes, image
    (spot, on_demand) = [m for s, m in checks if "fit the" in m]
    # gpu-spot-1 (GKE, 2 GPUs, its spot taint tolerated) and gpu-spot-2 (Karpenter, 1 GPU); not gpu-od-1
    assert "2 of 3 ready GPU node(s) with 4 nvidia.com/gpu fit the spot affinity: 3 GPUs" in spot
    assert "at most 3 of the 16 training pods at once" in spot
    assert "1 of 3 ready GPU node(s) with 4 nvidia.com/gpu fit the on-demand fallback" in on_demand
    assert not created(kube)


def test_a_problem_stops_the_submission_unless_skipped(kube, kubeconfig, capsys):
    del kube.secrets[("rethink", "rethink-s3")]
    assert submit.main(SPOT) == 1
    out = capsys.readouterr().out
    assert "preflight: 1 problem: nothing submitted (fix them, or pass --skip-preflight" in out
    assert not created(kube)
    assert submit.main([*SPOT, "--skip-preflight"]) == 0
    assert created(kube)


def test_workflow_crd_missing(kube, kubeconfig, capsys):
    kube.crd_installed = False
    assert submit.main([*LOCAL, "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "the Workflow CRD (workflows.argoproj.io) is not installed" in problem


def test_namespace_missing_skips_what_lives_in_it(kube, kubeconfig, capsys):
    assert submit.main([*LOCAL, "--namespace", "team", "--preflight-only"]) == 1
    checks = checks_of(capsys)
    (problem,) = only(checks, preflight.PROBLEM)
    assert "namespace team does not exist" in problem and "kubectl apply -k k8s/overlays/local" in problem
    assert [m for _, m in checks if "Secret" in m or "ServiceAccount" in m] == [problem]  # not checked apart


def test_secret_missing_or_lacking_a_key(kube, kubeconfig, capsys):
    kube.secrets[("rethink", "rethink-s3")].pop("AWS_SECRET_ACCESS_KEY")
    assert submit.main([*LOCAL, "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "Secret rethink-s3 in namespace rethink lacks AWS_SECRET_ACCESS_KEY" in problem
    assert "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=..." in problem

    kube.secrets[("rethink", "rethink-s3")]["AWS_SECRET_ACCESS_KEY"] = ""
    assert submit.main([*LOCAL, "--preflight-only"]) == 1
    assert "has an empty AWS_SECRET_ACCESS_KEY" in only(checks_of(capsys), preflight.PROBLEM)[0]

    assert submit.main([*LOCAL, "--s3-secret", "other-s3", "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "Secret other-s3 does not exist in namespace rethink" in problem


def test_secret_keys_come_from_the_rendered_pods():
    wf = rw.build_workflow(rw.Settings(suite="fig2b", s3_secret="s3")).to_dict()
    assert preflight.secret_keys(wf) == {
        "s3": (["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"])
    }


def test_sample_credentials_are_a_warning_on_a_cloud_profile(kube, kubeconfig, capsys):
    kube.secret_annotations[("rethink", "rethink-s3")] = {"rethink/sample-credentials": "true -- sample only"}
    assert submit.main([*SPOT, "--preflight-only"]) == 0
    (warning,) = only(checks_of(capsys), preflight.WARNING)
    assert "sample credentials" in warning
    assert submit.main([*LOCAL, "--preflight-only"]) == 0  # a throwaway local cluster: what they are for
    assert only(checks_of(capsys), preflight.WARNING) == []


def test_service_account_missing_or_without_the_executor_rights(kube, kubeconfig, capsys):
    kube.service_accounts.clear()
    assert submit.main([*LOCAL, "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "ServiceAccount rethink-workflow does not exist in namespace rethink" in problem

    kube.service_accounts.add(("rethink", "rethink-workflow"))
    kube.allowed = {a for a in kube.allowed if a[1] != "patch"}
    assert submit.main([*LOCAL, "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "may not patch workflowtaskresults.argoproj.io in namespace rethink" in problem
    reviews = [b for m, p, b in kube.requests if p.endswith("/localsubjectaccessreviews")]
    assert {r["spec"]["user"] for r in reviews} == {"system:serviceaccount:rethink:rethink-workflow"}
    assert "system:serviceaccounts:rethink" in reviews[0]["spec"]["groups"]


def test_what_you_may_not_ask_is_a_warning_not_a_problem(kube, kubeconfig, capsys):
    kube.forbidden |= {("POST", r".*/localsubjectaccessreviews"), ("GET", "/api/v1/nodes"),
                       ("GET", "/api/v1/namespaces/rethink")}  # fmt: skip
    assert submit.main(SPOT) == 0  # submitted: nothing is known to be wrong
    checks = checks_of(capsys)
    assert only(checks, preflight.PROBLEM) == []
    warnings = only(checks, preflight.WARNING)
    assert len(warnings) == 3
    (sa,) = [w for w in warnings if "ServiceAccount" in w]
    assert "not verified (you may not ask the API: 403 Forbidden)" in sa
    assert (
        "kubectl auth can-i patch workflowtaskresults.argoproj.io -n rethink --as=system:serviceaccount:rethink:rethink-workflow"
        in sa
    )
    assert any("kubectl get nodes" in w for w in warnings) and any(
        "kubectl get namespace rethink" in w for w in warnings
    )
    assert created(kube)


@pytest.mark.parametrize("nodes, words", [
    ([node("cpu", gpus=0), node("gpu-down", GKE_SPOT, ready=False), node("gpu-cordoned", GKE_SPOT, cordoned=True)],
     "no ready node has allocatable nvidia.com/gpu"),
    ([node("od-1", GKE_ON_DEMAND), node("od-2", KARPENTER_ON_DEMAND, gpus=4)],
     "2 ready GPU node(s) with 5 nvidia.com/gpu, none fits the spot affinity: label spot GPU nodes"),
    ([node("spot", KARPENTER_SPOT, taints=[{"key": "team", "value": "ml", "effect": "NoSchedule"}])],
     "the 1 that match carry a taint the pods do not tolerate (team=ml:NoSchedule): remove it"),
])  # fmt: skip
def test_gpu_nodes_for_spot(kube, kubeconfig, capsys, nodes, words):
    kube.nodes = nodes
    assert submit.main([*SPOT, "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert words in problem


def test_gpu_profile_counts_every_gpu_node_whose_taints_it_tolerates(kube, kubeconfig, capsys):
    assert submit.main([*SPOT[:3], "gpu", *SPOT[4:], "--preflight-only"]) == 0
    (gpu,) = [m for s, m in checks_of(capsys) if "GPU node" in m]
    # gpu-spot-2 and gpu-od-1 (its nvidia.com/gpu taint tolerated), not gpu-spot-1 (gke-spot taint: spot only)
    assert "2 of 3 ready GPU node(s) with 4 nvidia.com/gpu fit the training pods: 2 GPUs" in gpu


def test_on_demand_fallback_without_on_demand_nodes(kube, kubeconfig, capsys):
    kube.nodes = [n for n in kube.nodes if "od" not in n["metadata"]["name"]]
    assert submit.main([*SPOT, "--on-demand-after", "2", "--preflight-only"]) == 1
    (problem,) = only(checks_of(capsys), preflight.PROBLEM)
    assert "none fits the on-demand fallback (--on-demand-after 2)" in problem


def test_local_profile_needs_no_gpu_nodes(kube, kubeconfig, capsys):
    kube.nodes = [node("kind-control-plane", gpus=0)]
    assert submit.main([*LOCAL, "--preflight-only"]) == 0
    assert not any("GPU" in m for _, m in checks_of(capsys))
    assert "/api/v1/nodes" not in kube.paths()
    assert submit.main([*LOCAL, "--gpu", "--preflight-only"]) == 1  # asked for GPUs: then they must be there


@pytest.mark.parametrize("image, status", [
    ("registry.example.com/rethink:latest", preflight.PROBLEM),
    ("registry.example.com/rethink", preflight.PROBLEM),
    ("localhost:5000/rethink", preflight.PROBLEM),
    ("rethink:dev", preflight.WARNING),  # no registry: Docker Hub
    ("registry.example.com/rethink@sha256:" + "0" * 64, preflight.OK),
    ("localhost:5000/rethink:0.1", preflight.OK),
    (IMAGE, preflight.OK),
])  # fmt: skip
def test_image_on_a_cloud_profile(image, status):
    check = preflight.image_pinned(rw.Settings(suite="fig2b", profile="spot", image=image))
    assert check.status == status, check
    assert (
        preflight.image_pinned(rw.Settings(suite="fig2b", profile="local", image="rethink:latest")).status
        == "ok"
    )


def test_node_affinity_matching():
    """Terms are ORed, a term's expressions ANDed; the operators the builder and Kubernetes use."""
    spot = rw.node_selector_terms(rw.SPOT_AFFINITY)
    on_demand = rw.node_selector_terms(rw.ON_DEMAND_AFFINITY)
    for labels, is_spot in [(GKE_SPOT, True), (KARPENTER_SPOT, True), (GKE_ON_DEMAND, False),
                            (KARPENTER_ON_DEMAND, False), ({}, False)]:  # fmt: skip
        n = node("n", labels)
        assert preflight.matches(n, spot) == is_spot and preflight.matches(n, on_demand) == (not is_spot), (
            labels
        )
    n = node("n", {"a": "1", "size": "8"})
    assert preflight.matches(n, [{"matchExpressions": [{"key": "a", "operator": "Exists"},
                                                       {"key": "size", "operator": "Gt", "values": ["4"]}]}])  # fmt: skip
    assert not preflight.matches(n, [{"matchExpressions": [{"key": "a", "operator": "Exists"},
                                                           {"key": "size", "operator": "Lt", "values": ["4"]}]}])  # fmt: skip
    assert preflight.matches(
        n, [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}]
    )
    assert not preflight.matches(n, [{}])  # an empty term matches nothing
    assert preflight.matches(n, None)  # no affinity: every node


def test_tolerations():
    gke_gpu = node("g", GKE_ON_DEMAND, taints=[GKE_GPU_TAINT, {"key": "x", "effect": "PreferNoSchedule"}])
    assert preflight.tolerates(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], gke_gpu
    )
    assert not preflight.tolerates([], gke_gpu)
    assert preflight.untolerated([], gke_gpu) == [
        "nvidia.com/gpu=present:NoSchedule"
    ]  # PreferNoSchedule: no bar
    assert preflight.tolerates([{"operator": "Exists"}], gke_gpu)  # tolerates everything
    assert not preflight.tolerates(
        [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "other"}], gke_gpu
    )

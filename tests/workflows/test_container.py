"""The image built and run for real: the workflow's pods as containers of the project's own image.

The image is built from the repository's Dockerfile on the local CPU base (k8s/local/build-image.sh: Debian
13's python3-torch, made with debootstrap; nothing is pulled), with podman and runc. Then:
- the CLI runs in it as uid 10001, never as root;
- a rendered workflow's pods run as containers in dependency order, each made from its rendered spec the way
  the kubelet would: its environment from the sample Secret (the endpoint and keys of the cluster's MinIO
  replaced by those of a SeaweedFS server on the host), its securityContext, its emptyDir as a volume, its
  memory limit; the report lands in the bucket, and no container writes outside its volumes;
- a training pod stopped with a 15 s grace mid-epoch checkpoints and exits 143, one killed outright exits 137,
  and a new container with the same command finishes either run with exactly the metrics of an uninterrupted
  one.
Containers share the host's network namespace only to reach the S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.workflows.pods import ROOT, Pod, Pods, execution_order, rw

pytestmark = pytest.mark.container

IMAGE = "localhost/rethink:cpu"  # what k8s/local/build-image.sh builds with IMAGE=... (its default)
# runc, not crun (crun refuses some cgroup layouts), and explicit limits (the defaults can exceed a sandbox's).
ENGINE = ("podman", "--runtime", "runc")
LIMITS = ("--ulimit", "nproc=32768:32768", "--ulimit", "nofile=20000:20000")
# What the engine itself puts into every container's root filesystem: not the container's own writes.
ENGINE_PATHS = {"/etc", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/run", "/run/.containerenv"}
# The securityContext fields `security_options` translates; a field the builder adds later fails the test.
SECURITY_FIELDS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "supplementalGroups",
                   "allowPrivilegeEscalation", "capabilities", "readOnlyRootFilesystem"}  # fmt: skip
QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?")
UNITS = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}  # fmt: skip


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or out.returncode == 0, (
        f"podman {' '.join(args[:4])}: {out.stdout[-1500:]}{out.stderr[-2500:]}"
    )
    return out


def quantity(q: str) -> float:
    """A Kubernetes quantity as a number ('4Gi' -> 4294967296, '500m' -> 0.5)."""
    m = QUANTITY.fullmatch(q)
    assert m, f"not a quantity this test reads: {q!r}"
    return float(m.group(1)) * UNITS.get(m.group(2), 1)


@pytest.fixture(scope="session")
def image() -> str:
    """The image, built (or found up to date) by k8s/local/build-image.sh."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc debootstrap): no container tests")
    if os.geteuid() != 0:  # debootstrap, and emptyDirs owned by the pods' fsGroup
        pytest.skip("the container tests run rootful podman: run them as root")
    out = subprocess.run([str(ROOT / "k8s/local/build-image.sh")], env={**os.environ, "IMAGE": IMAGE},
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    print(out.stdout.strip().splitlines()[-1])  # its size and build time
    return IMAGE


def security_options(context: dict) -> list[str]:
    """podman options for a merged pod and container securityContext, as the kubelet would apply it."""
    assert set(context) <= SECURITY_FIELDS, (
        f"untranslated securityContext fields: {set(context) - SECURITY_FIELDS}"
    )
    uid, gid = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot"):
        assert uid not in (None, 0), "runAsNonRoot: the kubelet starts this only as a numeric non-root user"
    opts = ["--user", f"{uid}:{gid}" if gid is not None else str(uid)] if uid is not None else []
    for group in [context.get("fsGroup"), *context.get("supplementalGroups", [])]:
        if group is not None:
            opts += ["--group-add", str(group)]
    if context.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    capabilities = context.get("capabilities", {})
    opts += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
    opts += [f"--cap-add={c}" for c in capabilities.get("add", [])]
    if context.get("readOnlyRootFilesystem"):
        opts += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs a pod would not have either
    return opts


def root_writes(name: str) -> list[str]:
    """What a (stopped) container changed in its root filesystem, the engine's own files aside."""
    lines = engine("diff", name).stdout.splitlines()
    return sorted(line for line in lines if line.split(maxsplit=1)[-1] not in ENGINE_PATHS)


class ContainerPods(Pods):
    """Each pod a container of the image its spec names, made from the rendered pod as the kubelet would."""

    def __init__(self, wf: dict, secrets: dict[str, str], workdir: Path, read_only_root: bool = False):
        super().__init__(wf, secrets, workdir)
        self.pod_security = wf["spec"].get("securityContext", {})
        self.read_only_root = read_only_root  # a read-only root filesystem even where the spec has none
        self.written: dict[str, list[str]] = {}  # each pod's writes outside its volumes

    def name(self, pod: Pod) -> str:
        return f"rethink-test-{pod.task}-{pod.attempt}-{random.randrange(16**6):06x}"

    def command(self, pod: Pod, name: str) -> list[str]:
        """`podman run` for the pod: what its spec asks of the kubelet, plus the host network for S3."""
        context = {**self.pod_security, **pod.container.get("securityContext", {})}
        if self.read_only_root:
            context["readOnlyRootFilesystem"] = True
        opts = security_options(context)
        volumes = {v["name"]: v for v in pod.template.get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            assert "emptyDir" in volumes[mount["name"]], mount  # the pods' only kind of volume
            host = pod.volumes[mount["mountPath"]]
            # An emptyDir under fsGroup: group-owned by it, group-writable, setgid (what the kubelet does).
            if "fsGroup" in context:
                os.chown(host, 0, context["fsGroup"])
            host.chmod(0o2775 if "fsGroup" in context else 0o777)
            opts += ["--volume", f"{host}:{mount['mountPath']}"]
        limits = pod.container.get("resources", {}).get("limits", {})
        assert set(limits) <= {"memory", "cpu"}, limits  # a GPU pod is not this test's business
        if "memory" in limits:
            opts += ["--memory", str(int(quantity(limits["memory"])))]
        if "cpu" in limits:
            opts += ["--cpus", str(quantity(limits["cpu"]))]
        for key, value in pod.env.items():
            opts += ["--env", f"{key}={value}"]
        # No --init: as in a pod, `rethink` is PID 1 and gets the stop signal itself.
        return [*ENGINE, "run", "--name", name, "--pull", "never", "--network", "host", *LIMITS, *opts,
                pod.container["image"], *pod.args]  # fmt: skip

    def finish(self, pod: Pod, name: str) -> None:
        """Record what the stopped container wrote outside its volumes, then remove it."""
        self.written[f"{pod.task}-{pod.attempt}"] = root_writes(name)
        engine("rm", name)

    def execute(self, pod: Pod) -> tuple[int, str]:
        name = self.name(pod)
        out = subprocess.run(self.command(pod, name), capture_output=True, text=True, timeout=600)
        memory = engine("inspect", "--format", "{{.HostConfig.Memory}}", name, check=False).stdout.strip()
        if not memory:  # never created: podman's own error is the log
            return out.returncode, out.stdout + out.stderr
        limit = pod.container["resources"]["limits"]["memory"]
        assert int(memory) == quantity(limit), (memory, limit)  # the pod's limit is the container's
        self.finish(pod, name)
        return out.returncode, out.stdout + out.stderr


def secret_values(server) -> dict[str, str]:
    """The sample Secret's values, with the endpoint and keys of the cluster's MinIO replaced by the server's."""
    values = yaml.safe_load((ROOT / "k8s/base/s3-secret.yaml").read_text())["stringData"]
    replaced = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert set(replaced) <= set(values)
    return {**values, **{key: server.env[key] for key in replaced}}


def bucket_keys(server, url: str) -> set[str]:
    prefix = url.removeprefix(f"s3://{server.bucket}/") + "/"
    listing = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return {obj["Key"].removeprefix(prefix) for obj in listing.get("Contents", [])}


def read_metrics(server, url: str, run_id: str) -> list[dict]:
    key = url.removeprefix(f"s3://{server.bucket}/") + f"/runs/{run_id}/metrics.jsonl"
    body = server.client().get_object(Bucket=server.bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- the image


def test_cli_runs_in_the_image_as_uid_10001_not_root(image, rethink_cmd):
    assert engine("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == str(
        rw.IMAGE_UID
    )
    run = ("run", "--rm", "--pull", "never", "--network", "none", *LIMITS)
    ids = engine(
        *run, "--entrypoint", "python3", image, "-c", "import os; print(*os.getresuid(), *os.getresgid())"
    )
    assert ids.stdout.split() == [str(rw.IMAGE_UID)] * 6  # real, effective and saved uid and gid

    from rethink import __version__

    assert engine(*run, image, "--version").stdout.strip() == f"rethink {__version__}"
    models = json.loads(engine(*run, image, "models", "--json").stdout)
    here = json.loads(subprocess.run([*rethink_cmd, "models", "--json"], capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    assert models == here  # the same five models with the same parameter counts, on the image's torch
    assert all(m["params"] == m["paper_params"] for m in models)


# ---------------------------------------------------------------------------------------------- the workflow


def test_workflow_pods_run_as_containers_and_the_report_lands(image, s3_server, s3_url, tmp_path):
    settings = rw.Settings(suite="fig2b", profile="local", synthetic=True, smoke=True, epochs=1, store=s3_url,
                           device="cpu", image=image)  # fmt: skip
    wf = rw.build_workflow(settings).to_dict()
    pods = ContainerPods(wf, secret_values(s3_server), tmp_path / "pods")
    pods.run_all()
    report = "\n".join(f"--- {name}\n{log[-2000:]}" for name, log in pods.logs.items())
    assert pods.phases == dict.fromkeys(["data", "train-000", "train-001", "aggregate"], "Succeeded"), report
    assert "Traceback" not in report
    assert "nothing to push" in pods.logs["data"]

    keys = bucket_keys(s3_server, s3_url)
    for name in ("train-000", "train-001"):
        rid = pods.labels[name]["rethink/run-id"]
        assert f"runs/{rid}/result.json" in keys, sorted(keys)
        assert f"run {rid}" in pods.logs[name]  # the pod trained the run its label names
    assert "reports/synthetic/fig2b/report.html" in keys, sorted(keys)
    # Everything a pod keeps is in the store; its own writes stay in its emptyDir.
    assert pods.written == dict.fromkeys(pods.written, []), pods.written

    # So every pod also runs on a read-only root filesystem (a finished run's pod exits at once).
    pods.read_only_root = True
    for task in execution_order(wf)[:2] + execution_order(wf)[-1:]:
        pods.run(task)
    assert set(pods.phases.values()) == {"Succeeded"}, {k: v[-1500:] for k, v in pods.logs.items()}
    assert "already finished" in pods.logs["train-000"]


# ---------------------------------------------------------------------------------------------- preemption

# A run long enough to be stopped mid-epoch on any machine: MLP 1x512 on 10,000 synthetic images, 3 epochs.
PREEMPTED_TASK = "train-001"  # quickstart's random labels


def training_pod(image: str, server, url: str, workdir: Path) -> tuple[ContainerPods, dict]:
    """The workflow's pods with their data step done, and the training task to preempt."""
    settings = rw.Settings(suite="quickstart", profile="local", synthetic=True, epochs=3, store=url,
                           device="cpu", image=image)  # fmt: skip
    wf = rw.build_workflow(settings).to_dict()
    pods = ContainerPods(wf, secret_values(server), workdir, read_only_root=True)
    tasks = {t["name"]: t for t in execution_order(wf)}
    pods.run(tasks["data"])
    assert pods.phases["data"] == "Succeeded", pods.logs["data"][-3000:]
    return pods, tasks[PREEMPTED_TASK]


@pytest.fixture(scope="module")
def uninterrupted(image, s3_server, tmp_path_factory) -> list[dict]:
    """The metrics of the training pod run to its end in one container."""
    url = f"s3://{s3_server.bucket}/uninterrupted-{random.randrange(16**6):06x}"
    pods, task = training_pod(image, s3_server, url, tmp_path_factory.mktemp("uninterrupted"))
    pods.run(task)
    assert pods.phases[PREEMPTED_TASK] == "Succeeded", pods.logs[PREEMPTED_TASK][-3000:]
    return read_metrics(s3_server, url, pods.labels[PREEMPTED_TASK]["rethink/run-id"])


def stop_mid_run(pods: ContainerPods, task: dict, stop: list[str], ready=lambda: True) -> tuple[int, str]:
    """Start the pod and, once epoch 1 of 3 is done and `ready()`, run `stop` (podman, the container's name last)."""
    pod = pods.pod(task)
    name = pods.name(pod)
    proc = subprocess.Popen(
        pods.command(pod, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = []
    for line in proc.stdout:
        log.append(line)
        if " epoch 1/3" in line:  # two epochs to go, however fast the machine: the stop lands mid-run
            break
    deadline = time.monotonic() + 60
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.2))  # anywhere early in the next epoch: a step, an evaluation, a write
    engine(*stop, name, timeout=60)
    log.append(proc.stdout.read())
    proc.wait(60)
    pods.finish(pod, name)
    return proc.returncode, "".join(log)


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_a_preempted_training_container_resumes_to_identical_metrics(
    how, image, s3_server, tmp_path, uninterrupted, without_timing
):
    url = f"s3://{s3_server.bucket}/preempted-{how}-{random.randrange(16**6):06x}"
    pods, task = training_pod(image, s3_server, url, tmp_path / "pods")
    rid = {p["name"]: p["value"] for p in task["arguments"]["parameters"]}["run-id"]  # its pods' label
    if how == "graceful":  # a node drain or spot notice: SIGTERM, then SIGKILL after the grace period
        code, log = stop_mid_run(pods, task, ["stop", "-t", "15"])
        assert code == 143, log[-3000:]
        assert "SIGTERM" in log and "checkpoint written" in log and "Traceback" not in log, log[-3000:]
    else:  # the node vanished: no signal, no grace; killed once epoch 1's checkpoint is in the store
        checkpointed = lambda: f"runs/{rid}/checkpoint.pt" in bucket_keys(s3_server, url)  # noqa: E731
        code, log = stop_mid_run(pods, task, ["kill", "--signal", "KILL"], ready=checkpointed)
        assert code == 137, log[-3000:]
    keys = bucket_keys(s3_server, url)
    assert f"runs/{rid}/checkpoint.pt" in keys and f"runs/{rid}/result.json" not in keys, sorted(keys)

    pods.run(task)  # the retry: a new container (fresh emptyDir) with the same command
    resumed = pods.logs[PREEMPTED_TASK]
    assert pods.phases[PREEMPTED_TASK] == "Succeeded", resumed[-3000:]
    (position,) = re.findall(r"resuming at epoch (\d+), batch (\d+)", resumed)
    if how == "graceful":  # SIGTERM's checkpoint is at the next step boundary: inside an epoch
        assert int(position[1]) > 0, (position, log[-1500:])
    assert without_timing(read_metrics(s3_server, url, rid)) == without_timing(uninterrupted)

"""The Argo workflow for one suite, as a plain Hera value built without a cluster.

    data ──> train-000 ─┐
         ├─> train-001 ─┤
         ├─> ...        ├─> aggregate   (runs when any training task succeeded)
         └─> train-NNN ─┘

`data` puts the CIFAR-10 archive into the store once (`rethink data push`; a no-op with --synthetic). Each
training task is one pod with one GPU running the image's own CLI, `rethink train --suite S --index I`: the
pod expands the suite from the catalogue baked into the image, so only an index travels through Argo, never
a spec or a result (etcd keeps a workflow object below ~1 MB). A pod resumes its run from the store exactly
like a local run does, which is what makes retrying a preempted pod cheap. `aggregate` renders the report.

Training tasks are built from a list of work items (a task name, pod labels, CLI options): one per run
(`work_items`), or one per pack of runs trained together in one pod (`pack_items`, `--pack K`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from hera.workflows import (
    DAG,
    Container,
    EmptyDirVolume,
    Env,
    Parameter,
    Resources,
    RetryPolicy,
    RetryStrategy,
    SecretEnv,
    Task,
    Workflow,
)
from hera.workflows import models as m

from rethink.data.synthetic import default_identity
from rethink.spec import RunSpec
from rethink.suites import Options, expand
from rethink.training.grouping import group_packs

DEFAULT_IMAGE = "rethink:dev"
DEFAULT_NAMESPACE = "rethink"
DEFAULT_STORE = "s3://rethink/runs"
DEFAULT_SERVICE_ACCOUNT = "rethink-workflow"
DEFAULT_S3_SECRET = "rethink-s3"
DEFAULT_DEADLINE_HOURS = 72.0  # the whole workflow is stopped after this long (submit.py --deadline-hours)
IMAGE_UID = 10001  # the Dockerfile's non-root user; pods run as it and own their /data volume through fsGroup
DATA_DIR = "/data"  # an emptyDir in every pod, filled from the store's archive
LABEL = "rethink"  # label prefix: rethink/suite, rethink/run-id, rethink/role

# Retries. A training pod resumes from its last checkpoint, so retrying costs at most the minutes since then.
# Preemption (exit 137 = SIGKILL after the grace period, 143 = our checkpoint-and-exit on SIGTERM; or Argo's
# message for a pod whose node went away) is retried up to TRAIN_RETRY_LIMIT times; anything else (a bug, an
# OOM kill) only TRAIN_RETRY_OTHER times, so a real failure fails after TRAIN_RETRY_OTHER + 1 attempts.
# The expression is Argo's (expr-lang): lastRetry.exitCode and `retries` (attempts so far - 1) are strings.
# With --on-demand-after N the Nth retry and later ones go to on-demand nodes (on_demand_patch): Argo counts
# every failed attempt there, so up to TRAIN_RETRY_OTHER of those N may have been failures of another kind.
TRAIN_RETRY_LIMIT = 10
TRAIN_RETRY_OTHER = 2
PREEMPTION_EXIT_CODES = (137, 143)
PREEMPTION_MESSAGE = "(?i)imminent node shutdown|node shutdown|pod deleted|evict|preempt"
TRAIN_RETRY_EXPRESSION = (
    f"(asInt(lastRetry.exitCode) in [{', '.join(map(str, PREEMPTION_EXIT_CODES))}]"
    " && !(lastRetry.message contains 'OOMKilled'))"
    f" || lastRetry.message matches '{PREEMPTION_MESSAGE}'"
    f" || asInt(retries) < {TRAIN_RETRY_OTHER}"
)


def is_preemption(exit_code: str | int | None, message: str | None) -> bool:
    """Whether a failed attempt was a preemption, as TRAIN_RETRY_EXPRESSION's first two terms decide it."""
    message = message or ""
    try:
        killed = int(exit_code) in PREEMPTION_EXIT_CODES and "OOMKilled" not in message
    except (TypeError, ValueError):  # no exit code: the pod never ran, or its node vanished
        killed = False
    return killed or re.search(PREEMPTION_MESSAGE, message) is not None


@dataclass(frozen=True)
class Profile:
    """Where the pods run: what a training pod requests and where it may be scheduled."""

    name: str
    description: str
    gpu: bool  # one nvidia.com/gpu per training pod
    parallelism: int  # default number of training pods at once
    image_pull_policy: str | None = None  # None: Kubernetes' default
    cpu: str = "4"
    memory: str = "16Gi"
    memory_limit: str = "32Gi"
    tolerations: tuple[m.Toleration, ...] = ()
    node_affinity: m.NodeAffinity | None = None


GPU_RESOURCE = "nvidia.com/gpu"  # what a training pod requests (Hera's Resources(gpus=1))
GPU_TOLERATION = m.Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
# Spot capacity on GKE (label and optional taint cloud.google.com/gke-spot=true) or on EKS with Karpenter
# (label karpenter.sh/capacity-type=spot; a NodePool may also taint its spot nodes with that key). The node
# selector terms are ORed, so the same workflow runs on either cloud.
SPOT_TOLERATIONS = (
    GPU_TOLERATION,
    m.Toleration(key="cloud.google.com/gke-spot", operator="Equal", value="true", effect="NoSchedule"),
    m.Toleration(key="karpenter.sh/capacity-type", operator="Equal", value="spot", effect="NoSchedule"),
)
SPOT_AFFINITY = m.NodeAffinity(
    required_during_scheduling_ignored_during_execution=m.NodeSelector(
        node_selector_terms=[
            m.NodeSelectorTerm(
                match_expressions=[m.NodeSelectorRequirement(key="cloud.google.com/gke-spot", operator="In", values=["true"])]
            ),
            m.NodeSelectorTerm(
                match_expressions=[m.NodeSelectorRequirement(key="karpenter.sh/capacity-type", operator="In", values=["spot"])]
            ),
        ]
    )
)  # fmt: skip
# Where a training pod goes once spot capacity was taken from it often enough (--on-demand-after N): any node
# that is spot on neither cloud (no gke-spot label, Karpenter's capacity type not spot; NotIn also matches a
# node without the label). One term: both conditions hold together.
ON_DEMAND_AFFINITY = m.NodeAffinity(
    required_during_scheduling_ignored_during_execution=m.NodeSelector(
        node_selector_terms=[
            m.NodeSelectorTerm(
                match_expressions=[
                    m.NodeSelectorRequirement(key="cloud.google.com/gke-spot", operator="DoesNotExist"),
                    m.NodeSelectorRequirement(key="karpenter.sh/capacity-type", operator="NotIn", values=["spot"]),
                ]
            ),
        ]
    )
)  # fmt: skip

PROFILES = {
    p.name: p
    for p in [
        Profile("local", "kind or minikube: the image loaded into the node, no GPU unless --gpu, small requests",
                gpu=False, parallelism=2, image_pull_policy="IfNotPresent", cpu="500m", memory="1Gi",
                memory_limit="4Gi"),
        Profile("gpu", "one nvidia.com/gpu per training pod on any GPU node", gpu=True, parallelism=8,
                tolerations=(GPU_TOLERATION,)),
        Profile("spot", "gpu on spot capacity: GKE spot or EKS/Karpenter spot nodes, retried on preemption",
                gpu=True, parallelism=16, tolerations=SPOT_TOLERATIONS, node_affinity=SPOT_AFFINITY),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Everything the workflow depends on; the defaults are those of workflows/submit.py."""

    suite: str
    seeds: int = 1
    profile: str = "gpu"
    image: str = DEFAULT_IMAGE
    namespace: str = DEFAULT_NAMESPACE
    store: str = DEFAULT_STORE
    parallelism: int | None = None  # None: the profile's
    synthetic: bool = False
    epochs: int | None = None  # passed to every pod as --epochs
    smoke: bool = False  # passed to every pod as --smoke
    stop_at_acc: float | None = None  # passed to every pod as --stop-at-acc
    amp: bool = False  # passed to every pod as --amp: the suite's bf16 twins
    gpu: bool | None = None  # None: the profile's
    device: str | None = None  # passed to training pods as --device (None: the CLI's auto)
    pack: int = 1  # > 1: one pod per pack of up to this many compatible runs (rethink train --pack K)
    image_pull_policy: str | None = None  # None: the profile's
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    s3_secret: str = DEFAULT_S3_SECRET
    deadline_hours: float = DEFAULT_DEADLINE_HOURS  # the whole workflow
    pod_deadline_hours: float = 12.0  # one attempt of one pod
    on_demand_after: int | None = None  # spot only: from this many failed attempts on, on-demand nodes

    @property
    def profile_spec(self) -> Profile:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        return PROFILES[self.profile]

    @property
    def uses_gpu(self) -> bool:
        return self.profile_spec.gpu if self.gpu is None else self.gpu


@dataclass(frozen=True)
class WorkItem:
    """One training pod: its DAG task name, its own pod labels, and the CLI options that select its work."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)  # e.g. {"rethink/run-id": "3f2a..."}
    options: dict[str, str] = field(default_factory=dict)  # e.g. {"index": "7"} -> --index 7


def report_location(store: str, suite: str, synthetic: bool = False) -> str:
    """Where the aggregate step renders the suite's report (`rethink aggregate`: reports/<suite>/ in the store,
    reports/synthetic/<suite>/ for synthetic data)."""
    return f"{store.rstrip('/')}/{'reports/synthetic' if synthetic else 'reports'}/{suite}/report.html"


def suite_runs(s: Settings) -> list[RunSpec]:
    """The suite's runs exactly as a pod expands them (same data set identity, seeds and sizing)."""
    dataset = default_identity() if s.synthetic else "cifar10"
    return expand(s.suite, Options(dataset=dataset, seeds=s.seeds, epochs=s.epochs, smoke=s.smoke,
                                   target_acc=s.stop_at_acc, precision="bf16" if s.amp else "float32"))  # fmt: skip


def work_items(specs: list[RunSpec]) -> list[WorkItem]:
    """One training pod per run, addressed by its index in the suite."""
    width = max(3, len(str(len(specs) - 1)))
    return [
        WorkItem(
            name=f"train-{i:0{width}d}", labels={f"{LABEL}/run-id": spec.run_id}, options={"index": str(i)}
        )
        for i, spec in enumerate(specs)
    ]


def pack_items(specs: list[RunSpec], k: int) -> list[WorkItem]:
    """One training pod per pack of <= k compatible runs (`rethink plan --pack K`), addressed by pack index.

    A pack's run ids do not fit a label (63 characters), so its pods carry the pack index and the number of
    runs; `rethink plan --suite S --pack K` maps pack indices to run ids.
    """
    packs = group_packs(specs, k)
    width = max(3, len(str(len(packs) - 1)))
    return [
        WorkItem(
            name=f"pack-{j:0{width}d}",
            labels={f"{LABEL}/pack": str(j), f"{LABEL}/pack-runs": str(len(pack))},
            options={"pack-index": str(j)},
        )
        for j, pack in enumerate(packs)
    ]


def _suite_args(s: Settings) -> list[str]:
    """The options every pod passes so that it expands the suite exactly as the workflow did."""
    args = ["--suite", s.suite, "--seeds", str(s.seeds)]
    if s.epochs is not None:
        args += ["--epochs", str(s.epochs)]
    if s.smoke:
        args.append("--smoke")
    if s.stop_at_acc is not None:
        args += ["--stop-at-acc", repr(s.stop_at_acc)]
    if s.amp:
        args.append("--amp")
    if s.synthetic:
        args.append("--synthetic")
    return args


def _env(s: Settings) -> list:
    """S3 access from a Secret (keys named like the variables); the endpoint and region only where needed."""
    return [
        SecretEnv(name="AWS_ACCESS_KEY_ID", secret_name=s.s3_secret, secret_key="AWS_ACCESS_KEY_ID"),
        SecretEnv(name="AWS_SECRET_ACCESS_KEY", secret_name=s.s3_secret, secret_key="AWS_SECRET_ACCESS_KEY"),
        SecretEnv(
            name="AWS_ENDPOINT_URL", secret_name=s.s3_secret, secret_key="AWS_ENDPOINT_URL", optional=True
        ),
        SecretEnv(
            name="AWS_DEFAULT_REGION", secret_name=s.s3_secret, secret_key="AWS_DEFAULT_REGION", optional=True
        ),
        # Ride out a MinIO restart rather than fail the pod.
        Env(name="RETHINK_S3_RETRY_SECONDS", value="300"),
    ]


def _param_name(label_key: str) -> str:
    return label_key.rsplit("/", 1)[-1]


def _container(s: Settings, name: str, args: list[str], resources: Resources, **kw) -> Container:
    return Container(
        name=name,
        image=s.image,
        image_pull_policy=s.image_pull_policy or s.profile_spec.image_pull_policy,
        command=["rethink"],
        args=args,
        env=_env(s),
        resources=resources,
        volumes=[EmptyDirVolume(name="data", mount_path=DATA_DIR, size_limit="4Gi")],
        # The root filesystem is read-only: a pod writes only to its /data volume (the image sends caches there,
        # and temporary files: TMPDIR), so nothing it leaves behind can outlive it unnoticed.
        security_context=m.SecurityContext(
            allow_privilege_escalation=False, capabilities=m.Capabilities(drop=["ALL"]),
            read_only_root_filesystem=True,
        ),  # fmt: skip
        **kw,
    )


def node_selector_terms(affinity: m.NodeAffinity) -> list[dict]:
    """The required node selector terms of an affinity, as they appear in the pod spec."""
    selector = affinity.required_during_scheduling_ignored_during_execution
    return [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in selector.node_selector_terms]


def on_demand_patch(n: int, spot: m.NodeAffinity) -> str:
    """A training template's podSpecPatch: from attempt n on (`retries` >= n), ON_DEMAND_AFFINITY's terms.

    Argo renders a pod template's fields for each attempt with `retries` = the attempt's number (0 for the
    first), evaluating `{{=...}}` as an expr-lang expression, and applies podSpecPatch as a strategic merge
    patch: a list of node selector terms replaces the template's. Attempts before n get the spot terms again.
    Argo's template tags end at the first `}}`, so the expression is only the list, never a whole object.
    """
    spot_terms, on_demand_terms = (json.dumps(node_selector_terms(a), separators=(",", ":"))
                                   for a in (spot, ON_DEMAND_AFFINITY))  # fmt: skip
    for terms in (spot_terms, on_demand_terms):
        if "{{" in terms or "}}" in terms or "'" in terms:  # would end the tag or the expr string early
            raise ValueError(f"node selector terms cannot go into an Argo expression: {terms}")
    expression = f"{{{{=asInt(retries) >= {n} ? '{on_demand_terms}' : '{spot_terms}'}}}}"
    return ('{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":'
            f'{{"nodeSelectorTerms":{expression}}}}}}}}}')  # fmt: skip


def _small_retry() -> RetryStrategy:
    return RetryStrategy(
        limit=3, retry_policy=RetryPolicy.always, backoff=m.Backoff(duration="30s", factor=2, cap="5m")
    )


def build_workflow(s: Settings, items: list[WorkItem] | None = None) -> Workflow:
    """The workflow for the settings (training tasks from `items`, by default one per run of the suite)."""
    profile = s.profile_spec
    if s.seeds < 1:
        raise ValueError("seeds must be at least 1")
    if s.on_demand_after is not None:
        if profile.node_affinity is None:
            raise ValueError(f"on_demand_after needs a profile with spot affinity (spot), not {profile.name}")
        if not 1 <= s.on_demand_after <= TRAIN_RETRY_LIMIT:
            raise ValueError(f"on_demand_after must be between 1 and {TRAIN_RETRY_LIMIT} (the retry limit)")
    if items is None:
        specs = suite_runs(s)
        items = pack_items(specs, s.pack) if s.pack > 1 else work_items(specs)
    if not items:
        raise ValueError(f"suite {s.suite} has no runs")
    option_names, label_keys = list(items[0].options), list(items[0].labels)
    if any(list(i.options) != option_names or list(i.labels) != label_keys for i in items):
        raise ValueError("every work item must have the same options and labels")
    if len({*option_names, *map(_param_name, label_keys)}) != len(option_names) + len(label_keys):
        raise ValueError("work item options and label names must be distinct")

    suite_args = _suite_args(s)
    store_args = ["--store", s.store, "--data-dir", DATA_DIR]
    role = f"{LABEL}/role"

    data = _container(
        s, "data",
        ["data", "push", *store_args, *(["--synthetic"] if s.synthetic else [])],
        Resources(cpu_request="250m", memory_request="1Gi", memory_limit="2Gi"),
        labels={role: "data"},
        retry_strategy=_small_retry(),
    )  # fmt: skip

    train_args = ["train", *suite_args, *(["--pack", str(s.pack)] if s.pack > 1 else []), *store_args,
                  *(["--device", s.device] if s.device else [])]  # fmt: skip
    for opt in option_names:
        train_args += [f"--{opt}", f"{{{{inputs.parameters.{opt}}}}}"]
    train = _container(
        s, "train", train_args,
        Resources(cpu_request=profile.cpu, memory_request=profile.memory, memory_limit=profile.memory_limit,
                  gpus=1 if s.uses_gpu else None),
        inputs=[Parameter(name=n) for n in [*option_names, *map(_param_name, label_keys)]],
        labels={role: "train", **{k: f"{{{{inputs.parameters.{_param_name(k)}}}}}" for k in label_keys}},
        retry_strategy=RetryStrategy(
            limit=TRAIN_RETRY_LIMIT,
            retry_policy=RetryPolicy.always,
            expression=TRAIN_RETRY_EXPRESSION,
            backoff=m.Backoff(duration="1m", factor=2, cap="15m"),
        ),
        active_deadline_seconds=int(s.pod_deadline_hours * 3600),
        tolerations=list(profile.tolerations) or None,
        affinity=m.Affinity(node_affinity=profile.node_affinity) if profile.node_affinity else None,
        pod_spec_patch=(on_demand_patch(s.on_demand_after, profile.node_affinity)
                        if s.on_demand_after is not None else None),
    )  # fmt: skip

    aggregate = _container(
        s, "aggregate",
        ["aggregate", *suite_args, *store_args],
        Resources(cpu_request="1", memory_request="2Gi", memory_limit="8Gi"),
        labels={role: "aggregate"},
        retry_strategy=_small_retry(),
    )  # fmt: skip

    tasks = [Task(name="data", template=data)]
    for item in items:
        values = {**item.options, **{_param_name(k): v for k, v in item.labels.items()}}
        tasks.append(
            Task(
                name=item.name,
                template=train,
                depends="data",
                arguments=[Parameter(name=k, value=v) for k, v in values.items()],
            )
        )
    # Every training task finishes (or fails for good) before this is decided; a failed run leaves a hole in
    # the report rather than no report.
    tasks.append(
        Task(name="aggregate", template=aggregate, depends=" || ".join(f"{i.name}.Succeeded" for i in items))
    )
    main = DAG(name="main", fail_fast=False, tasks=tasks)

    suite_labels = {"app.kubernetes.io/name": "rethink", f"{LABEL}/suite": s.suite}
    return Workflow(
        generate_name=f"rethink-{s.suite}-",
        namespace=s.namespace,
        labels={**suite_labels, f"{LABEL}/profile": profile.name, f"{LABEL}/seeds": str(s.seeds)},
        annotations={
            "workflows.argoproj.io/description": f"rethink suite {s.suite}: {len(items)} training pods, "
            f"{s.seeds} seed(s), profile {profile.name}"
            + (f" (on-demand after {s.on_demand_after} failed attempts)" if s.on_demand_after else "")
            + f", store {s.store}"
        },
        entrypoint="main",
        service_account_name=s.service_account,
        parallelism=s.parallelism or profile.parallelism,
        active_deadline_seconds=int(s.deadline_hours * 3600),
        pod_gc=m.PodGC(strategy="OnPodSuccess"),  # failed pods stay for `kubectl logs`
        ttl_strategy=m.TTLStrategy(seconds_after_success=7 * 24 * 3600),
        pod_metadata=m.Metadata(labels=suite_labels),
        security_context=m.PodSecurityContext(
            run_as_non_root=True, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, fs_group=IMAGE_UID
        ),
        templates=[main, data, train, aggregate],
    )

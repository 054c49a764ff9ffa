"""Render a suite's Argo workflow, check the cluster (preflight), submit it, and follow it; or print it
(--dry-run) with what it will cost.

    python workflows/submit.py --suite smoke --synthetic --profile local     # kind/minikube: your kubeconfig
    python workflows/submit.py --suite full --profile spot --on-demand-after 3 --image REGISTRY/rethink:TAG --watch
    python workflows/submit.py --suite full --profile spot --preflight-only  # is the cluster ready?
    python workflows/submit.py status NAME [--watch]                         # how far a submitted suite is

Two ways to submit, like the argo CLI: without an Argo Server, the Workflow object is created through the
Kubernetes API with your kubeconfig (--kubeconfig/KUBECONFIG, --context; inside a pod, its service account);
with --argo-server/ARGO_SERVER (and --token/ARGO_TOKEN), through that Argo Server's REST API. The preflight
runs before every submission. See docs/cluster.md for a cluster from nothing to a report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rethink.cli.options import HelpFormatter, Parser, add_expansion_options

PROG = "submit.py"
WORKFLOW_EXTRA = ("hera", "kubernetes")  # what `pip install -e '.[workflows]'` brings


def _missing_extra(name: str) -> str:
    return (f"{PROG}: the workflow tools need the [workflows] extra ({name} is not installed): "
            "pip install -e '.[workflows]'")  # fmt: skip

try:
    from workflows import builder as rw
    from workflows import preflight, watch
    from workflows.cluster import ClusterError, Submitter
    from workflows.golden import render_golden
except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in WORKFLOW_EXTRA:
        raise
    print(_missing_extra(e.name), file=sys.stderr)
    sys.exit(2)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    """How to reach the cluster, the same for submitting and for `status`."""
    p.add_argument("--namespace", default=rw.DEFAULT_NAMESPACE, help="Kubernetes namespace of the workflow")
    p.add_argument("--kubeconfig", default=None,
                   help="kubeconfig for the Kubernetes API (default: $KUBECONFIG, else ~/.kube/config; inside a pod "
                        "without one, the pod's service account)")  # fmt: skip
    p.add_argument(
        "--context", default=None, help="kubeconfig context (default: the kubeconfig's current context)"
    )
    p.add_argument("--argo-server", default=None,
                   help="go through this Argo Server URL instead of the Kubernetes API "
                        "(default: $ARGO_SERVER, else none: the Kubernetes API)")  # fmt: skip
    p.add_argument(
        "--token", default=None, help="bearer token for the Argo Server (default: $ARGO_TOKEN, else none)"
    )
    p.add_argument("--insecure", action="store_true",
                   help="skip TLS verification of the Argo Server, e.g. a port-forwarded self-signed one "
                        "(default: $ARGO_INSECURE_SKIP_VERIFY == true)")  # fmt: skip
    p.add_argument("--interval", type=float, default=watch.DEFAULT_INTERVAL,
                   help="with --watch: seconds between two reads of the workflow")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--suite", help="suite to run (see rethink suites); required (no default) unless --regenerate-golden")
    add_expansion_options(p)  # the CLI's own definition: the pods expand the suite exactly as this does
    p.add_argument("--pack", type=int, default=1,
                   help="train up to K compatible runs per pod as one batched model (rethink train --pack K); "
                        "1: one pod per run")  # fmt: skip
    p.add_argument(
        "--profile",
        choices=rw.PROFILES,
        default="gpu",
        help="; ".join(f"{p.name}: {p.description}" for p in rw.PROFILES.values()),
    )
    p.add_argument("--on-demand-after", type=int, default=None, metavar="N",
                   help="with --profile spot: a training pod that failed N times (preempted, mostly) runs its "
                        "next attempts on on-demand GPU nodes (default: never, every attempt on spot)")  # fmt: skip
    p.add_argument("--image", default=rw.DEFAULT_IMAGE, help="the rethink image the pods run")
    p.add_argument("--store", default=rw.DEFAULT_STORE, help="s3://bucket/prefix where runs and reports live")
    p.add_argument("--s3-secret", default=rw.DEFAULT_S3_SECRET,
                   help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL, "
                        "AWS_DEFAULT_REGION")  # fmt: skip
    p.add_argument("--service-account", default=rw.DEFAULT_SERVICE_ACCOUNT, help="ServiceAccount of the pods")
    p.add_argument("--parallelism", type=int, default=None,
                   help="training pods (GPUs) at once (default: " +
                        ", ".join(f"{p.parallelism} for {p.name}" for p in rw.PROFILES.values()) + ")")  # fmt: skip
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="request one nvidia.com/gpu per training pod (default: only with the gpu and spot profiles)",
    )
    p.add_argument(
        "--image-pull-policy",
        choices=("Always", "IfNotPresent", "Never"),
        default=None,
        help="imagePullPolicy of the pods (default: IfNotPresent for local, Kubernetes' own otherwise)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="pods train on the deterministic synthetic set instead of CIFAR-10 (no data download)",
    )
    p.add_argument(
        "--deadline-hours", type=float, default=rw.DEFAULT_DEADLINE_HOURS, help="the workflow is stopped after this long"
    )
    _add_cluster_options(p)
    p.add_argument("--preflight-only", action="store_true",
                   help="check that the cluster is ready for the workflow and exit (default: check, then submit)")  # fmt: skip
    p.add_argument("--skip-preflight", action="store_true",
                   help="submit without checking the cluster first (default: a problem the check finds stops the "
                        "submission)")  # fmt: skip
    p.add_argument(
        "--watch",
        action="store_true",
        help="after submitting, follow the workflow until it finishes (default: submit and exit)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print (or --output) the YAML and a summary; submit nothing"
    )
    p.add_argument(
        "--output",
        default=None,
        help="also write the workflow YAML to this file (default: none; with --dry-run: stdout)",
    )
    p.add_argument(
        "--regenerate-golden",
        action="store_true",
        help="rewrite the golden YAML in workflows/golden/ and exit",
    )
    return p


def build_status_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} status", formatter_class=HelpFormatter,
               description="How far a submitted suite is, from its Workflow object: training pods pending, running, "
                           "succeeded and failed, failed attempts split into preemptions and other failures, the "
                           "run ids of the failures, and the report once aggregation finished.")  # fmt: skip
    p.add_argument("name", help="the workflow's name, as submit.py printed it (e.g. rethink-full-x7k2p)")
    p.add_argument("--watch", action="store_true",
                   help="follow the workflow, a line whenever something changes, until it finishes "
                        "(default: print once)")  # fmt: skip
    _add_cluster_options(p)
    return p


def settings_from_args(a: argparse.Namespace) -> rw.Settings:
    return rw.Settings(
        suite=a.suite, seeds=a.seeds, profile=a.profile, image=a.image, namespace=a.namespace, store=a.store,
        parallelism=a.parallelism, synthetic=a.synthetic, epochs=a.epochs, smoke=a.smoke, stop_at_acc=a.stop_at_acc,
        amp=a.amp, gpu=a.gpu,
        image_pull_policy=a.image_pull_policy, service_account=a.service_account, s3_secret=a.s3_secret,
        deadline_hours=a.deadline_hours, pack=a.pack, on_demand_after=a.on_demand_after,
    )  # fmt: skip


def summary(s: rw.Settings, specs, workflow_dict: dict) -> str:
    from rethink.experiments.estimates import source
    from rethink.suites import estimate_seconds

    size = len(json.dumps(workflow_dict, separators=(",", ":")))
    at_once = s.parallelism or s.profile_spec.parallelism
    n_pods = len(rw.pack_items(specs, s.pack)) if s.pack > 1 else len(specs)
    packed = f" (packs of <= {s.pack} runs)" if s.pack > 1 else ""
    pods = f"{n_pods} training pods{packed}, " + ("1 GPU each" if s.uses_gpu else "no GPU requested")
    precision = "bf16" if s.amp else "float32"
    cost = f"estimated {estimate_seconds(specs, 'gpu') / 3600:.2f} GPU-hours ({precision}; {source('gpu', {x.model for x in specs})})"
    if not s.uses_gpu:
        cost += f" or {estimate_seconds(specs, 'cpu') / 3600:.2f} CPU-hours (2 cores)"
    fallback = f"; on-demand nodes after {s.on_demand_after} failed attempts" if s.on_demand_after else ""
    return (
        f"suite {s.suite}, {s.seeds} seed(s), profile {s.profile}{fallback}: {len(specs)} runs -> {pods}, "
        f"at most {at_once} at once\n"
        f"{cost}, " + (f"each run until {s.stop_at_acc:g} training accuracy or its epoch cap" if s.stop_at_acc else
                       "every run to its epoch cap") + f"{'; bf16 runs (--amp)' if s.amp else ''}\n"
        f"workflow object: {size / 1024:.0f} KiB (etcd limit ~1 MiB); image {s.image}; store {s.store}"
    )


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------- the cluster


def argo_server(a: argparse.Namespace) -> str | None:
    return a.argo_server or os.environ.get("ARGO_SERVER") or None


def submitter(a: argparse.Namespace) -> Submitter:
    """The Argo Server when one is named, else the Kubernetes API; ClusterError when it cannot be set up."""
    from workflows.argo_server import ArgoServer
    from workflows.kube import KubeSubmitter, connect

    server = argo_server(a)
    if server:
        insecure = a.insecure or os.environ.get("ARGO_INSECURE_SKIP_VERIFY", "").lower() == "true"
        return ArgoServer(server, a.namespace, a.token or os.environ.get("ARGO_TOKEN"), insecure)
    return KubeSubmitter(connect(a.kubeconfig, a.context), a.namespace)


def run_preflight(a: argparse.Namespace, s: rw.Settings, workflow: dict, target: Submitter) -> bool:
    """Print every check; whether none found a problem. Through an Argo Server, the checks still need the
    Kubernetes API (the kubeconfig); without it they are one problem, which --skip-preflight passes over."""
    from workflows.kube import KubeSubmitter, connect

    try:
        kube = target.kube if isinstance(target, KubeSubmitter) else connect(a.kubeconfig, a.context)
        print(f"preflight of {kube.where}, namespace {s.namespace}:")
        checks = preflight.run(kube, s, workflow)
    except ClusterError as e:
        if isinstance(target, KubeSubmitter):
            raise  # the same API would refuse the submission
        print(f"preflight: {preflight.PROBLEM}: it needs the Kubernetes API: {e}; or pass --skip-preflight to "
              f"submit through {target.where} unchecked")  # fmt: skip
        return False
    print(preflight.render(checks))
    found = len(preflight.problems(checks))
    warnings = sum(c.status == preflight.WARNING for c in checks)
    noted = f", {warnings} warning{'s' * (warnings != 1)}" if warnings else ""
    if found:
        stop = "nothing submitted" if not a.preflight_only else "the cluster is not ready"
        print(f"preflight: {found} problem{'s' * (found != 1)}{noted}: {stop} (fix them, or pass --skip-preflight "
              "to submit anyway)")  # fmt: skip
    else:
        print(f"preflight: ready{noted}")
    return not found


def follow_command(a: argparse.Namespace, name: str) -> str:
    """The status command that reaches this workflow the way it was submitted."""
    options = []
    if a.namespace != rw.DEFAULT_NAMESPACE:
        options.append(f"--namespace {a.namespace}")
    if a.argo_server:
        options.append(f"--argo-server {a.argo_server}")
    elif not argo_server(a):
        options += [f"--{flag} {value}" for flag, value in (("kubeconfig", a.kubeconfig), ("context", a.context))
                    if value]  # fmt: skip
    return " ".join([f"python workflows/{PROG} status {name}", *options, "--watch"])


def _watch(target: Submitter, name: str, interval: float) -> int:
    try:
        return watch.watch(lambda: target.get(name), interval)
    except KeyboardInterrupt:
        print(f"\nstopped watching; {name} keeps running (python workflows/{PROG} status {name})")
        return 130


# ---------------------------------------------------------------------------------------------- commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.regenerate_golden:
        for path in render_golden():
            print(f"wrote {path}")
        return 0
    if not a.suite:
        parser.error("--suite is required")
    if a.seeds < 1:
        parser.error("--seeds must be at least 1")
    if a.parallelism is not None and a.parallelism < 1:
        parser.error("--parallelism must be at least 1")
    if a.pack < 1:
        parser.error("--pack must be at least 1")
    if a.on_demand_after is not None:
        if rw.PROFILES[a.profile].node_affinity is None:
            parser.error(
                f"--on-demand-after needs --profile spot (the {a.profile} profile does not use spot nodes)"
            )
        if not 1 <= a.on_demand_after <= rw.TRAIN_RETRY_LIMIT:
            parser.error(f"--on-demand-after must be between 1 and {rw.TRAIN_RETRY_LIMIT} (the retry limit)")
    if a.interval <= 0:
        parser.error("--interval must be positive")
    if a.preflight_only and (a.skip_preflight or a.dry_run or a.watch):
        parser.error("--preflight-only submits nothing: drop --skip-preflight, --dry-run and --watch")
    if a.watch and a.dry_run:
        parser.error("--watch follows a submitted workflow: drop --dry-run")

    from rethink.errors import UserError

    s = settings_from_args(a)
    try:
        specs = rw.suite_runs(s)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    items = rw.pack_items(specs, a.pack) if a.pack > 1 else rw.work_items(specs)
    workflow = rw.build_workflow(s, items)
    text = workflow.to_yaml()
    if a.output:
        Path(a.output).write_text(text)
    workflow_dict = workflow.to_dict()
    if a.dry_run:
        if not a.output:
            sys.stdout.write(text)
        print(summary(s, specs, workflow_dict) + (f"\nwrote {a.output}" if a.output else ""),
              file=sys.stderr if not a.output else sys.stdout)  # fmt: skip
        return 0
    print(summary(s, specs, workflow_dict))
    try:
        target = submitter(a)
        if not a.skip_preflight:
            ready = run_preflight(a, s, workflow_dict, target)
            if a.preflight_only or not ready:
                return 0 if ready else 1
        name = target.create(workflow_dict)
    except ClusterError as e:
        return _fail(str(e))
    print(f"submitted workflow {name} in namespace {s.namespace} through {target.where}")
    print(f"follow it:  {follow_command(a, name)}")
    print(f"  or:       argo watch -n {s.namespace} {name}")
    print(f"  or:       kubectl -n {s.namespace} get pods -l workflows.argoproj.io/workflow={name} --watch")
    print(f"report:     {rw.report_location(s.store, s.suite, s.synthetic)} once the aggregate step ran")
    if a.watch:
        try:
            return _watch(target, name, a.interval)
        except ClusterError as e:
            return _fail(str(e))
    return 0


def status_main(argv: list[str]) -> int:
    """`submit.py status NAME [--watch]`: the workflow's progress, once or until it finishes."""
    parser = build_status_parser()
    a = parser.parse_args(argv)
    if a.interval <= 0:
        parser.error("--interval must be positive")
    try:
        target = submitter(a)
        if a.watch:
            return _watch(target, a.name, a.interval)
        print("\n".join(watch.status_lines(watch.progress(target.get(a.name)))))
    except ClusterError as e:
        return _fail(str(e))
    return 0


def entry() -> int:
    """main(), with a missing extra (the Kubernetes client, imported when a cluster is reached) as one line."""
    try:
        return main()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in WORKFLOW_EXTRA:
            raise
        print(_missing_extra(e.name), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(entry())

"""Render a suite's Argo workflow and submit it, or print it (--dry-run) with what it will cost.

    python workflows/submit.py --suite smoke --synthetic --dry-run          # YAML on stdout, summary on stderr
    python workflows/submit.py --suite full --profile spot --parallelism 16 --image REGISTRY/rethink:TAG

Submission goes through the Argo server's REST API (Hera's WorkflowsService): --argo-server / ARGO_SERVER and
--token / ARGO_TOKEN. See docs/cluster.md for a cluster from nothing to a report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from rethink.cli.options import HelpFormatter
from workflows import builder as rw
from workflows.golden import render_golden

DEFAULT_ARGO_SERVER = "https://localhost:2746"
REQUEST_TIMEOUT = 30  # seconds; Hera's requests carry none of their own


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--suite", help="suite to run (see rethink suites); required unless --regenerate-golden")
    p.add_argument("--seeds", type=int, default=1, help="repeat the suite over this many seeds")
    p.add_argument("--pack", type=int, default=1,
                   help="train up to K compatible runs per pod as one batched model (rethink train --pack K); "
                        "1: one pod per run")  # fmt: skip
    p.add_argument(
        "--profile",
        choices=rw.PROFILES,
        default="gpu",
        help="; ".join(f"{p.name}: {p.description}" for p in rw.PROFILES.values()),
    )
    p.add_argument("--image", default=rw.DEFAULT_IMAGE, help="the rethink image the pods run")
    p.add_argument("--namespace", default=rw.DEFAULT_NAMESPACE, help="Kubernetes namespace of the workflow")
    p.add_argument("--store", default=rw.DEFAULT_STORE, help="s3://bucket/prefix where runs and reports live")
    p.add_argument("--s3-secret", default=rw.DEFAULT_S3_SECRET,
                   help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL, "
                        "AWS_DEFAULT_REGION")  # fmt: skip
    p.add_argument("--service-account", default=rw.DEFAULT_SERVICE_ACCOUNT, help="ServiceAccount of the pods")
    p.add_argument(
        "--argo-server",
        default=None,
        help=f"Argo server URL (default: $ARGO_SERVER, else {DEFAULT_ARGO_SERVER})",
    )
    p.add_argument(
        "--token", default=None, help="bearer token for the Argo server (default: $ARGO_TOKEN, else none)"
    )
    p.add_argument("--insecure", action="store_true",
                   help="skip TLS verification of the Argo server, e.g. a port-forwarded self-signed one "
                        "(default: $ARGO_INSECURE_SKIP_VERIFY == true)")  # fmt: skip
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
        "--epochs", type=int, default=None, help="cap every run at this many epochs (default: the suite's)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="size the suite like the smoke suite (256 images, 2 epochs)"
    )
    p.add_argument(
        "--deadline-hours", type=float, default=72.0, help="the workflow is stopped after this long"
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


def settings_from_args(a: argparse.Namespace) -> rw.Settings:
    return rw.Settings(
        suite=a.suite, seeds=a.seeds, profile=a.profile, image=a.image, namespace=a.namespace, store=a.store,
        parallelism=a.parallelism, synthetic=a.synthetic, epochs=a.epochs, smoke=a.smoke, gpu=a.gpu,
        image_pull_policy=a.image_pull_policy, service_account=a.service_account, s3_secret=a.s3_secret,
        deadline_hours=a.deadline_hours, pack=a.pack,
    )  # fmt: skip


def summary(s: rw.Settings, specs, workflow_dict: dict) -> str:
    from rethink.suites import estimate_seconds

    size = len(json.dumps(workflow_dict, separators=(",", ":")))
    at_once = s.parallelism or s.profile_spec.parallelism
    n_pods = len(rw.pack_items(specs, s.pack)) if s.pack > 1 else len(specs)
    packed = f" (packs of <= {s.pack} runs)" if s.pack > 1 else ""
    pods = f"{n_pods} training pods{packed}, " + ("1 GPU each" if s.uses_gpu else "no GPU requested")
    cost = f"estimated {estimate_seconds(specs, 'gpu') / 3600:.2f} GPU-hours (one H100, float32; targets, not yet measured)"
    if not s.uses_gpu:
        cost += f" or {estimate_seconds(specs, 'cpu') / 3600:.2f} CPU-hours (2 cores)"
    return (
        f"suite {s.suite}, {s.seeds} seed(s), profile {s.profile}: {len(specs)} runs -> {pods}, "
        f"at most {at_once} at once\n"
        f"{cost}, every run to its epoch cap\n"
        f"workflow object: {size / 1024:.0f} KiB (etcd limit ~1 MiB); image {s.image}; store {s.store}"
    )


def _fail(message: str) -> int:
    print(f"submit.py: error: {message}", file=sys.stderr)
    return 1


def submit(workflow, s: rw.Settings, server: str, token: str | None, insecure: bool) -> int:
    """Create the workflow through the Argo server; one line and exit 1 on any failure to do so."""
    import requests
    from hera.exceptions import Forbidden, HeraException, Unauthorized
    from hera.workflows import WorkflowsService

    class Session(requests.Session):
        def request(self, *args, **kwargs):
            kwargs.setdefault("timeout", REQUEST_TIMEOUT)
            return super().request(*args, **kwargs)

    if not server.startswith(("http://", "https://")):
        return _fail(f"--argo-server {server!r} must be an http:// or https:// URL")
    if insecure:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    workflow.workflows_service = WorkflowsService(
        host=server, token=token or None, verify_ssl=not insecure, namespace=s.namespace, session=Session()
    )
    try:
        with warnings.catch_warnings():  # Hera 7 calls a method pydantic 2 deprecates; nothing for the user
            warnings.simplefilter("ignore", DeprecationWarning)
            created = workflow.create()
    except requests.exceptions.SSLError as e:
        return _fail(f"TLS to the Argo server at {server} failed ({_reason(e)}); for a port-forwarded server "
                     "with a self-signed certificate pass --insecure")  # fmt: skip
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        return _fail(f"cannot reach the Argo server at {server} ({_reason(e)}); start a port-forward "
                     "(kubectl -n argo port-forward svc/argo-server 2746:2746) or set --argo-server/ARGO_SERVER")  # fmt: skip
    except (Unauthorized, Forbidden) as e:
        return _fail(f"the Argo server at {server} rejected the token ({e.status_code} "
                     f"{'unauthorized' if isinstance(e, Unauthorized) else 'forbidden'}) for namespace "
                     f"{s.namespace}: set --token/ARGO_TOKEN to a token allowed to create workflows there "
                     "(docs/cluster.md: kubectl create token)")  # fmt: skip
    except HeraException as e:
        return _fail(f"the Argo server at {server} refused the workflow: {e}")
    name = created.metadata.name
    print(f"submitted workflow {name} in namespace {s.namespace}")
    print(f"watch it:   argo watch -n {s.namespace} {name}")
    print(f"  or:       kubectl -n {s.namespace} get pods -l workflows.argoproj.io/workflow={name} --watch")
    print(f"report:     {s.store.rstrip('/')}/reports/{s.suite}/report.html once the aggregate step ran")
    return 0


def _reason(e: Exception) -> str:
    """The innermost cause of a requests error, short and on one line (e.g. '[Errno 111] Connection refused')."""
    inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
    text = " ".join(str(getattr(inner, "reason", None) or inner).split())
    return text.rsplit(": ", 1)[-1][:200] or type(e).__name__


def main(argv: list[str] | None = None) -> int:
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

    from rethink.errors import UserError

    s = settings_from_args(a)
    try:
        specs = rw.suite_runs(s)
    except UserError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    if a.pack < 1:
        parser.error("--pack must be at least 1")
    items = rw.pack_items(specs, a.pack) if a.pack > 1 else rw.work_items(specs)
    workflow = rw.build_workflow(s, items)
    text = workflow.to_yaml()
    if a.output:
        Path(a.output).write_text(text)
    if a.dry_run:
        if not a.output:
            sys.stdout.write(text)
        print(summary(s, specs, workflow.to_dict()) + (f"\nwrote {a.output}" if a.output else ""),
              file=sys.stderr if not a.output else sys.stdout)  # fmt: skip
        return 0
    print(summary(s, specs, workflow.to_dict()))
    server = a.argo_server or os.environ.get("ARGO_SERVER") or DEFAULT_ARGO_SERVER
    insecure = a.insecure or os.environ.get("ARGO_INSECURE_SKIP_VERIFY", "").lower() == "true"
    return submit(workflow, s, server, a.token or os.environ.get("ARGO_TOKEN"), insecure)


if __name__ == "__main__":
    raise SystemExit(main())

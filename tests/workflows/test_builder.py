"""The Argo workflow: strictly valid against Argo v4's schema, one single-GPU pod per run, retries, aggregation,
size, profiles, the golden renderings, and pod command lines the real CLI accepts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
from hera.workflows import Workflow

from rethink.suites import SUITES, Options, expand
from workflows import builder as rw
from workflows import golden, submit

ROOT = Path(__file__).resolve().parents[2]

SCHEMA = ROOT / "workflows" / "schema" / "argo-workflows-v4.1.2.schema.json"  # Argo's own, in the repository
WORKFLOW_DEF = "io.argoproj.workflow.v1alpha1.Workflow"


@pytest.fixture(scope="session")
def validator():
    """Argo's schema made strict: IntOrString takes integers too, unknown fields are errors."""
    jsonschema = pytest.importorskip("jsonschema")
    definitions = json.loads(SCHEMA.read_text())["definitions"]
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["integer", "string"]}
    for d in definitions.values():
        if "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    schema = {"$ref": f"#/definitions/{WORKFLOW_DEF}", "definitions": definitions}
    return jsonschema.Draft202012Validator(schema)


def assert_valid(validator, wf: dict) -> None:
    errors = sorted(validator.iter_errors(wf), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10]
    )


def render(**kw) -> dict:
    return rw.build_workflow(rw.Settings(**kw)).to_dict()


def templates(wf: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wf["spec"]["templates"]}


def dag_tasks(wf: dict) -> list[dict]:
    (main,) = [t for t in wf["spec"]["templates"] if "dag" in t]
    return main["dag"]["tasks"]


def train_tasks(wf: dict) -> list[dict]:
    return [t for t in dag_tasks(wf) if t["template"] == "train"]


def params(task: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}


# ---------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("profile", list(rw.PROFILES))
@pytest.mark.parametrize("suite", list(SUITES))
def test_every_suite_and_profile_validates_strictly(validator, suite, profile):
    assert_valid(validator, render(suite=suite, profile=profile))


def test_options_validate_strictly(validator):
    assert_valid(validator, render(suite="fig2b", profile="local", synthetic=True, smoke=True, epochs=1, seeds=3,
                                   gpu=True, device="cpu", image_pull_policy="Never", parallelism=1))  # fmt: skip


def test_strict_schema_rejects_unknown_fields_and_accepts_int_or_string(validator):
    wf = render(suite="fig2b")
    templates(wf)["train"]["container"]["imagePullPolcy"] = "Never"  # a typo
    assert list(validator.iter_errors(wf))
    wf = render(suite="fig2b")
    assert isinstance(templates(wf)["train"]["retryStrategy"]["limit"], int)  # IntOrString as an integer
    templates(wf)["train"]["retryStrategy"]["limit"] = "10"
    assert_valid(validator, wf)


# ---------------------------------------------------------------------------------------------- fan-out


def plan_run_ids(*argv: str) -> list[str]:
    """The run ids `rethink plan --json` prints, in order."""
    from rethink.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--json", *argv]) == 0
    return [row["run_id"] for row in json.loads(out.getvalue())]


@pytest.mark.parametrize("suite", ["full", "table1", "smoke", "fig2b"])
def test_one_single_gpu_pod_per_run(suite):
    wf = render(suite=suite)  # the default profile: gpu
    runs = expand(suite, Options())
    tasks = train_tasks(wf)
    assert len(tasks) == len(runs)
    assert [params(t)["index"] for t in tasks] == [str(i) for i in range(len(runs))]
    assert [params(t)["run-id"] for t in tasks] == [s.run_id for s in runs]
    train = templates(wf)["train"]
    assert "container" in train  # one pod per task: a container template ...
    for task in dag_tasks(wf):  # ... never expanded into several pods
        assert not {"withItems", "withParam", "withSequence"} & set(task)
    resources = train["container"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    for name in ("data", "aggregate"):  # the other pods need no GPU
        assert "nvidia.com/gpu" not in json.dumps(templates(wf)[name]["container"]["resources"])


def test_full_fans_out_over_rethink_plan(tmp_path, monkeypatch, validator):
    """The done criterion: submit.py --suite full --dry-run --output wf.yaml has one GPU pod per planned run."""
    import yaml

    monkeypatch.chdir(tmp_path)  # `rethink plan` looks at ./data for the data set's identity: keep it empty
    out = tmp_path / "wf.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        assert submit.main(["--suite", "full", "--dry-run", "--output", str(out)]) == 0
    wf = yaml.safe_load(out.read_text())
    assert_valid(validator, wf)
    tasks = train_tasks(wf)
    assert [params(t)["run-id"] for t in tasks] == plan_run_ids("--suite", "full")
    assert templates(wf)["train"]["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_synthetic_and_sizing_options_match_the_pods_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = render(suite="fig2b", synthetic=True, smoke=True, epochs=1, seeds=2)
    expected = plan_run_ids("--suite", "fig2b", "--synthetic", "--smoke", "--epochs", "1", "--seeds", "2")
    assert [params(t)["run-id"] for t in train_tasks(wf)] == expected
    args = templates(wf)["train"]["container"]["args"]
    for flag in ("--synthetic", "--smoke"):
        assert flag in args
    assert args[args.index("--epochs") + 1] == "1" and args[args.index("--seeds") + 1] == "2"


def test_pod_command_lines_parse_with_the_real_cli():
    from rethink.cli import build_parser

    wf = render(suite="table1", seeds=2, synthetic=True)
    parser = build_parser()
    for task in dag_tasks(wf):
        container = templates(wf)[task["template"]]["container"]
        assert container["command"] == ["rethink"]
        values = params(task)
        args = [re.sub(r"\{\{inputs\.parameters\.([\w-]+)\}\}", lambda m: values[m.group(1)], a)  # noqa: B023
                for a in container["args"]]  # fmt: skip
        parsed = parser.parse_args(args)
        assert parsed.store == rw.DEFAULT_STORE
        assert parsed.data_dir == rw.DATA_DIR
        if task["template"] == "train":
            assert (parsed.suite, parsed.seeds, parsed.index) == ("table1", 2, int(params(task)["index"]))


def test_no_spec_or_result_travels_through_parameters():
    wf = render(suite="full")
    for task in dag_tasks(wf):
        for name, value in params(task).items():
            assert name in ("index", "run-id") and len(value) <= 16, (name, value)
    assert "outputs" not in json.dumps(wf)


def test_full_with_five_seeds_is_far_below_etcd_limit():
    wf = render(suite="full", seeds=5, profile="spot")
    assert len(train_tasks(wf)) == len(expand("full", Options(seeds=5))) == 265
    size = len(json.dumps(wf, separators=(",", ":")))
    assert size < 200 * 1024, f"{size} bytes"  # etcd's limit is ~1.5 MB, Argo's comfort zone ~1 MB


# ---------------------------------------------------------------------------------------------- DAG shape


def test_data_first_then_training_then_aggregation():
    wf = render(suite="fig1a")
    tasks = dag_tasks(wf)
    assert tasks[0]["name"] == "data" and "depends" not in tasks[0]
    assert all(t["depends"] == "data" for t in train_tasks(wf))
    (agg,) = [t for t in tasks if t["template"] == "aggregate"]
    terms = [t.strip() for t in agg["depends"].split("||")]
    assert terms == [f"{t['name']}.Succeeded" for t in train_tasks(wf)]  # any training task succeeded
    main = templates(wf)["main"]
    assert main["dag"]["failFast"] is False
    agg_args = templates(wf)["aggregate"]["container"]["args"]
    assert agg_args[:5] == ["aggregate", "--suite", "fig1a", "--seeds", "1"]
    assert templates(wf)["data"]["container"]["args"][:2] == ["data", "push"]


def test_retry_strategy_on_training_pods():
    train = templates(render(suite="smoke"))["train"]
    retry = train["retryStrategy"]
    assert retry["limit"] == rw.TRAIN_RETRY_LIMIT == 10
    assert retry["retryPolicy"] == "Always"  # deleted pods are Errors, killed containers Failures
    assert retry["backoff"]["duration"] and retry["backoff"]["factor"] == 2
    expr = retry["expression"]
    for needle in ("137", "143", "lastRetry.exitCode", "imminent node shutdown", "pod deleted",
                   f"asInt(retries) < {rw.TRAIN_RETRY_OTHER}"):  # fmt: skip
        assert needle in expr
    assert re.compile(rw.PREEMPTION_MESSAGE).search(
        "Pod was terminated in response to imminent node shutdown."
    )
    assert re.compile(rw.PREEMPTION_MESSAGE).search("pod deleted")
    assert not re.compile(rw.PREEMPTION_MESSAGE).search("Error (exit code 1)")
    assert train["activeDeadlineSeconds"] > 0


def test_workflow_settings_and_labels():
    wf = render(suite="table1", seeds=3, parallelism=5, namespace="ns1", service_account="sa1")
    spec, meta = wf["spec"], wf["metadata"]
    assert meta["namespace"] == "ns1" and meta["generateName"] == "rethink-table1-"
    assert meta["labels"]["rethink/suite"] == "table1" and meta["labels"]["rethink/seeds"] == "3"
    assert spec["parallelism"] == 5 and spec["serviceAccountName"] == "sa1"
    assert spec["podGC"]["strategy"] and spec["activeDeadlineSeconds"] > 0
    assert spec["podMetadata"]["labels"]["rethink/suite"] == "table1"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == rw.IMAGE_UID
    train = templates(wf)["train"]
    assert train["metadata"]["labels"] == {
        "rethink/role": "train",
        "rethink/run-id": "{{inputs.parameters.run-id}}",
    }
    env = {e["name"]: e for e in train["container"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": rw.DEFAULT_S3_SECRET, "key": key,
                                                        **({"optional": True} if key == "AWS_ENDPOINT_URL" else {})}  # fmt: skip
        assert "value" not in env[key]


def test_profiles():
    local = templates(render(suite="fig2b", profile="local"))["train"]
    assert "nvidia.com/gpu" not in json.dumps(local)
    assert local["container"]["imagePullPolicy"] == "IfNotPresent"
    assert "tolerations" not in local and "affinity" not in local
    asked = templates(render(suite="fig2b", profile="local", gpu=True))["train"]
    assert asked["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    never = templates(render(suite="fig2b", profile="local", image_pull_policy="Never"))["train"]
    assert never["container"]["imagePullPolicy"] == "Never"

    gpu = templates(render(suite="fig2b", profile="gpu"))["train"]
    assert gpu["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "affinity" not in gpu

    spot = templates(render(suite="fig2b", profile="spot"))["train"]
    assert spot["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    tolerations = {(t["key"], t.get("value")) for t in spot["tolerations"]}
    assert {("cloud.google.com/gke-spot", "true"), ("karpenter.sh/capacity-type", "spot")} <= tolerations
    terms = spot["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    # Two alternative terms (ORed), not one node selector demanding both clouds at once.
    assert [t["matchExpressions"][0]["key"] for t in terms] == [
        "cloud.google.com/gke-spot",
        "karpenter.sh/capacity-type",
    ]


def test_work_items_generalize_to_packs(validator):
    """Packing K runs per pod is a different list of work items: the builder needs no change."""
    items = [rw.WorkItem(name=f"pack-{j}", labels={"rethink/pack": str(j)}, options={"pack-index": str(j)})
             for j in range(3)]  # fmt: skip
    wf = rw.build_workflow(rw.Settings(suite="fig1a"), items)
    assert_valid(validator, wf.to_dict())
    wf = wf.to_dict()
    assert [params(t) for t in train_tasks(wf)] == [{"pack-index": str(j), "pack": str(j)} for j in range(3)]
    assert templates(wf)["train"]["container"]["args"][-2:] == [
        "--pack-index",
        "{{inputs.parameters.pack-index}}",
    ]
    with pytest.raises(ValueError):
        rw.build_workflow(
            rw.Settings(suite="fig1a"), [items[0], rw.WorkItem(name="x", options={"index": "0"})]
        )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="profile"):
        render(suite="fig2b", profile="moon")
    with pytest.raises(ValueError, match="seeds"):
        render(suite="fig2b", seeds=0)


# ---------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", list(golden.GOLDEN))
def test_golden(name, validator):
    """The committed YAML equals the rendering (compared as Hera models); REGENERATE_GOLDEN=1 rewrites it."""
    path = golden.GOLDEN_DIR / f"{name}.yaml"
    rendered = rw.build_workflow(golden.GOLDEN[name])
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        path.write_text(rendered.to_yaml())
    assert path.exists(), f"missing {path}: run python workflows/submit.py --regenerate-golden"
    committed = Workflow.from_yaml(path.read_text())
    assert committed.to_dict() == rendered.to_dict(), (
        f"{path} differs from the rendering: if the change is intended, run "
        "python workflows/submit.py --regenerate-golden and review the diff"
    )
    assert_valid(validator, committed.to_dict())


# ---------------------------------------------------------------------------------------------- packing


def test_pack_fans_out_one_pod_per_planned_pack(tmp_path, monkeypatch, validator):
    """submit.py --pack K: one single-GPU pod per pack of `rethink plan --pack K`, each running the CLI's pack."""
    import yaml

    from rethink.cli import build_parser, main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "wf.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        assert submit.main(["--suite", "full", "--pack", "8", "--dry-run", "--output", str(out)]) == 0
    wf = yaml.safe_load(out.read_text())
    assert_valid(validator, wf)
    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        assert main(["plan", "--suite", "full", "--pack", "8", "--json"]) == 0
    packs = json.loads(plan.getvalue())
    tasks = train_tasks(wf)
    assert [int(params(t)["pack-index"]) for t in tasks] == [p["pack_index"] for p in packs]
    assert [int(params(t)["pack-runs"]) for t in tasks] == [p["size"] for p in packs]
    assert sum(p["size"] for p in packs) == len(
        plan_run_ids("--suite", "full")
    )  # every run in exactly one pod
    container = templates(wf)["train"]["container"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = [a.replace("{{inputs.parameters.pack-index}}", "3") for a in container["args"]]
    parsed = build_parser().parse_args(args)
    assert (parsed.suite, parsed.pack, parsed.pack_index, parsed.index) == ("full", 8, 3, None)


# ---------------------------------------------------------------------------------------------- spot, then on-demand


def render_attempt(patch: str, retries: int) -> dict:
    """A podSpecPatch as Argo renders it for the attempt numbered `retries` (0 first): its one `{{=...}}` tag,
    which ends at the first `}}` as in Argo's template parser, evaluated, then the patch parsed as JSON."""
    start = patch.index("{{=")
    end = patch.index("}}", start)
    assert "{{" not in patch[end:], "one tag only"
    m = re.fullmatch(r"asInt\(retries\) >= (\d+) \? '([^']*)' : '([^']*)'", patch[start + 3 : end])
    assert m, patch[start:end]
    value = m.group(2) if retries >= int(m.group(1)) else m.group(3)
    return json.loads(patch[:start] + value + patch[end + 2 :])


def test_on_demand_after_n_failed_attempts(validator):
    from tests.workflows.fake_kube import GKE_ON_DEMAND, GKE_SPOT, KARPENTER_ON_DEMAND, KARPENTER_SPOT, node
    from workflows.preflight import matches

    wf = render(suite="fig2b", profile="spot", on_demand_after=3)
    assert_valid(validator, wf)
    train = templates(wf)["train"]
    required = "requiredDuringSchedulingIgnoredDuringExecution"
    spot_terms = train["affinity"]["nodeAffinity"][required]["nodeSelectorTerms"]
    nodes = {name: node(name, labels) for name, labels in [("gke-spot", GKE_SPOT), ("karpenter-spot", KARPENTER_SPOT),
             ("gke-on-demand", GKE_ON_DEMAND), ("karpenter-on-demand", KARPENTER_ON_DEMAND)]}  # fmt: skip
    for retries in range(rw.TRAIN_RETRY_LIMIT + 1):
        patch = render_attempt(train["podSpecPatch"], retries)
        assert list(patch) == ["affinity"]  # nothing but where the pod may go
        # a strategic merge patch replaces the list of node selector terms (it has no merge key)
        terms = patch["affinity"]["nodeAffinity"][required]["nodeSelectorTerms"]
        fits = {name for name, n in nodes.items() if matches(n, terms)}
        if retries < 3:
            assert terms == spot_terms and fits == {"gke-spot", "karpenter-spot"}
        else:
            assert fits == {"gke-on-demand", "karpenter-on-demand"}, retries
    for name in ("data", "aggregate"):
        assert "podSpecPatch" not in templates(wf)[name]
    assert "podSpecPatch" not in templates(render(suite="fig2b", profile="spot"))["train"]
    assert (
        "on-demand after 3 failed attempts"
        in wf["metadata"]["annotations"]["workflows.argoproj.io/description"]
    )


def test_on_demand_after_needs_spot_and_a_count_within_the_retry_limit(capsys):
    with pytest.raises(ValueError, match="spot"):
        render(suite="fig2b", profile="gpu", on_demand_after=3)
    for n in (0, rw.TRAIN_RETRY_LIMIT + 1):
        with pytest.raises(ValueError, match="between 1 and"):
            render(suite="fig2b", profile="spot", on_demand_after=n)
    for args, words in [(["--profile", "gpu", "--on-demand-after", "3"],
                          "--on-demand-after needs --profile spot (the gpu profile does not use spot nodes)"),
                         (["--profile", "spot", "--on-demand-after", "11"],
                          "--on-demand-after must be between 1 and 10 (the retry limit)")]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            submit.main(["--suite", "fig2b", "--dry-run", *args])
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines()[0] == f"submit.py: error: {words}"

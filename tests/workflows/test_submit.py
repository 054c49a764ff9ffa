"""workflows/submit.py against a fake Argo Server on 127.0.0.1: what it POSTs, and one clear line when the
server cannot be reached or refuses the token; the preflight on this path (through the kubeconfig);
--dry-run, --output, the help's defaults. The Kubernetes API path: tests/workflows/test_kube.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from tests.cli.test_cli import undocumented_defaults
from tests.workflows.local_http import LocalHTTPServer
from workflows import builder as rw
from workflows import golden, submit

ROOT = Path(__file__).resolve().parents[2]

CREATED_NAME = "rethink-fig2b-x7k2p"
ARGS = ["--suite", "fig2b", "--profile", "local", "--synthetic", "--skip-preflight"]


class FakeArgo(LocalHTTPServer):
    """A tiny Argo Server: records each request, answers POST /api/v1/workflows/<ns> like Argo does, and
    GET /api/v1/workflows/<ns>/<name> with `workflows[name]`."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[dict] = []
        self.workflows: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": None})
                name = self.path.rsplit("/", 1)[-1]
                if fake.status != 200:
                    self._send(fake.status, {"code": 16, "message": "token not valid"})
                elif name in fake.workflows:
                    self._send(200, fake.workflows[name])
                else:
                    self._send(404, {"code": 5, "message": f'workflows.argoproj.io "{name}" not found'})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if fake.status == 200:
                    created = dict(body["workflow"])
                    created["metadata"] = {**created["metadata"], "name": CREATED_NAME, "uid": "1234"}
                    self._send(200, created)
                else:  # Argo's error body: a gRPC status as JSON
                    self._send(fake.status, {"code": 16, "message": "token not valid"})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.serve(Handler)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_posts_the_workflow(capsys):
    with FakeArgo() as argo:
        rc = submit.main([*ARGS, "--argo-server", argo.url, "--token", "secret-token", "--namespace", "team"])
    out = capsys.readouterr().out
    assert rc == 0
    (req,) = argo.requests
    assert req["path"] == "/api/v1/workflows/team"
    assert req["headers"]["Authorization"] == "Bearer secret-token"
    sent = req["body"]["workflow"]
    expected = rw.build_workflow(
        rw.Settings(suite="fig2b", profile="local", synthetic=True, namespace="team")
    )
    assert sent == expected.to_dict()
    assert len([t for t in sent["spec"]["templates"][0]["dag"]["tasks"] if t["template"] == "train"]) == 2
    assert CREATED_NAME in out
    assert f"argo watch -n team {CREATED_NAME}" in out
    assert f"workflows.argoproj.io/workflow={CREATED_NAME}" in out


def test_server_and_token_from_the_environment(monkeypatch, capsys):
    with FakeArgo() as argo:
        monkeypatch.setenv("ARGO_SERVER", argo.url)
        monkeypatch.setenv("ARGO_TOKEN", "Bearer from-env")
        assert submit.main(ARGS) == 0
    assert argo.requests[0]["headers"]["Authorization"] == "Bearer from-env"
    assert argo.requests[0]["path"] == f"/api/v1/workflows/{rw.DEFAULT_NAMESPACE}"


@pytest.mark.parametrize("status, word", [(401, "unauthorized"), (403, "forbidden")])
def test_rejected_token_is_one_line(status, word, capsys):
    with FakeArgo(status=status) as argo:
        rc = submit.main([*ARGS, "--argo-server", argo.url, "--token", "bad"])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1, err
    assert f"rejected the token ({status} {word})" in err and "ARGO_TOKEN" in err


def test_other_refusal_is_one_line(capsys):
    with FakeArgo(status=500) as argo:
        rc = submit.main([*ARGS, "--argo-server", argo.url])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "refused the workflow" in err


def test_unreachable_server_is_one_line_without_traceback():
    url = f"http://127.0.0.1:{closed_port()}"
    out = subprocess.run([sys.executable, str(ROOT / "workflows/submit.py"), *ARGS, "--argo-server", url],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert "cannot reach the Argo Server" in out.stderr and url in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_bad_server_url_and_bad_suite(capsys):
    assert submit.main([*ARGS, "--argo-server", "localhost:2746"]) == 1
    assert "http:// or https://" in capsys.readouterr().err
    assert submit.main(["--suite", "nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_yaml_and_summary(capsys):
    assert submit.main([*ARGS, "--dry-run"]) == 0
    captured = capsys.readouterr()
    wf = yaml.safe_load(captured.out)
    assert wf["kind"] == "Workflow" and wf["metadata"]["generateName"] == "rethink-fig2b-"
    assert "2 runs -> 2 training pods" in captured.err and "GPU-hours" in captured.err


def test_dry_run_output_file(tmp_path, capsys):
    out = tmp_path / "wf.yaml"
    assert submit.main(["--suite", "full", "--seeds", "2", "--dry-run", "--output", str(out)]) == 0
    summary = capsys.readouterr().out
    wf = yaml.safe_load(out.read_text())
    assert wf == rw.build_workflow(rw.Settings(suite="full", seeds=2)).to_dict()
    assert "106 runs -> 106 training pods, 1 GPU each, at most 8 at once" in summary
    from rethink.suites import Options, estimate_seconds, expand

    hours = estimate_seconds(expand("full", Options(seeds=2))) / 3600  # every run to its 100-epoch cap
    assert f"{hours:.2f} GPU-hours" in summary and f"wrote {out}" in summary


def test_every_flag_states_its_actual_default():
    """Each option's help shows its default value, or says what happens without it (tests/cli/test_cli.py)."""
    assert undocumented_defaults(submit.build_parser()) == []
    assert undocumented_defaults(submit.build_status_parser()) == []


def test_argo_server_path_runs_the_preflight_through_the_kubeconfig(kube, kubeconfig, capsys):
    """The checks read the cluster with the kubeconfig; the workflow still goes to the Argo Server."""
    args = [a for a in ARGS if a != "--skip-preflight"]
    with FakeArgo() as argo:
        assert submit.main([*args, "--argo-server", argo.url]) == 0
    out = capsys.readouterr().out
    assert "preflight: ready" in out and f"submitted workflow {CREATED_NAME}" in out
    assert [r["path"] for r in argo.requests] == ["/api/v1/workflows/rethink"]
    assert "/api/v1/namespaces/rethink/secrets/rethink-s3" in kube.paths("GET")
    assert not [p for p in kube.paths("POST") if p.endswith("/workflows")]  # not created twice


def test_argo_server_without_a_kubeconfig_stops_at_the_preflight(capsys):
    args = [a for a in ARGS if a != "--skip-preflight"]
    with FakeArgo() as argo:
        assert submit.main([*args, "--argo-server", argo.url]) == 1
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("preflight")]
    assert "PROBLEM" in line and "no kubeconfig" in line and "--skip-preflight" in line
    assert argo.requests == []


def test_status_through_the_argo_server(capsys):
    wf = {"metadata": {"name": CREATED_NAME}, "spec": rw.build_workflow(rw.Settings(suite="fig2b")).to_dict()["spec"],
          "status": {"phase": "Running"}}  # fmt: skip
    with FakeArgo() as argo:
        argo.workflows[CREATED_NAME] = wf
        assert submit.main(["status", CREATED_NAME, "--argo-server", argo.url, "--token", "t"]) == 0
        assert submit.main(["status", "rethink-nope", "--argo-server", argo.url]) == 1
    captured = capsys.readouterr()
    assert f"{CREATED_NAME} Running: 2 runs: 2 pending, 0 running" in captured.out
    assert argo.requests[0]["path"] == f"/api/v1/workflows/rethink/{CREATED_NAME}"
    assert argo.requests[0]["headers"]["Authorization"] == "Bearer t"
    assert (
        captured.err.strip().splitlines() == [captured.err.strip()]
        and "no workflow rethink-nope" in captured.err
    )


def test_regenerate_golden_writes_every_golden_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    assert submit.main(["--regenerate-golden"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.yaml" for n in golden.GOLDEN)
    for name in golden.GOLDEN:
        assert (tmp_path / f"{name}.yaml").read_text() == (
            ROOT / "workflows/golden" / f"{name}.yaml"
        ).read_text()


def test_submit_takes_the_suite_options_from_the_clis_own_definition():
    """submit.py's suite options are the CLI's (same flags, defaults, types and help as `rethink run`), and
    builder.Settings' defaults are what submit.py parses when given only a suite."""
    from rethink.cli import build_parser

    def actions(parser):
        return {flag: a for a in parser._actions for flag in a.option_strings}

    run = actions(next(a for a in build_parser()._actions if a.dest == "command").choices["run"])
    sub = actions(submit.build_parser())
    for flag in ("--seeds", "--epochs", "--smoke", "--stop-at-acc", "--amp"):
        a, b = run[flag], sub[flag]
        assert (a.dest, a.default, a.type, a.help, type(a)) == (b.dest, b.default, b.type, b.help, type(b)), flag
    assert submit.settings_from_args(submit.build_parser().parse_args(["--suite", "fig2b"])) == rw.Settings("fig2b")


def test_pods_expand_the_suite_the_submitter_expanded(capsys):
    """With --stop-at-acc and --amp the workflow's runs are the ones `rethink plan` names with the same flags,
    and every pod is told both."""
    from rethink.cli import main

    s = submit.settings_from_args(submit.build_parser().parse_args(
        ["--suite", "fig2b", "--synthetic", "--stop-at-acc", "0.9", "--amp"]))  # fmt: skip
    assert main(["plan", "--suite", "fig2b", "--synthetic", "--stop-at-acc", "0.9", "--amp", "--json"]) == 0
    planned = [r["run_id"] for r in json.loads(capsys.readouterr().out)]
    assert [spec.run_id for spec in rw.suite_runs(s)] == planned
    assert all(spec.precision == "bf16" and spec.target_train_acc == 0.9 for spec in rw.suite_runs(s))
    text = json.dumps(rw.build_workflow(s).to_dict())
    assert '"--stop-at-acc", "0.9"' in text and '"--amp"' in text

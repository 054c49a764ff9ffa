"""The end of a `rethink` process (cli.process_main's quick exit) loses nothing: its exit code, what it printed,
its atexit handlers, the threads it still waits for; and the start's paused collector is switched back on."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest

from rethink.cli.commands import collector_paused


def _process(tmp_path, body: str) -> subprocess.CompletedProcess:
    """A process whose `main` is `body` (a function of `out`, the tmp folder), run as process_main runs it."""
    script = textwrap.dedent(
        """
        import atexit, pathlib, sys, threading, time
        import rethink.cli

        out = pathlib.Path(sys.argv[1])

        def main():
        {body}

        rethink.cli.main = main
        raise SystemExit(rethink.cli.process_main())
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as in a pipe
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


def test_exit_code_output_and_atexit_handlers_survive_the_quick_exit(tmp_path):
    p = _process(tmp_path, """
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        print("buffered line, never flushed by main")  # stdout is a pipe here: block-buffered
        print("to stderr", file=sys.stderr)
        return 3
    """)
    assert p.returncode == 3, p.stderr
    assert p.stdout == "buffered line, never flushed by main\n"
    assert p.stderr == "to stderr\n"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_process_still_waits_for_a_running_non_daemon_thread(tmp_path):
    p = _process(tmp_path, """
        def late():
            time.sleep(0.5)
            (out / "late").write_text("written after main returned")

        threading.Thread(target=late).start()
        return 0
    """)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "late").read_text() == "written after main returned"


def test_an_uncaught_error_still_ends_with_its_traceback(tmp_path):
    p = _process(tmp_path, """
        raise RuntimeError("boom")
    """)
    assert p.returncode == 1
    assert "RuntimeError: boom" in p.stderr


@pytest.mark.parametrize("was_enabled", [True, False])
def test_collector_paused_restores_the_collector_also_after_an_error(was_enabled):
    before = gc.isenabled()
    try:
        (gc.enable if was_enabled else gc.disable)()
        with collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is was_enabled
        with pytest.raises(ImportError), collector_paused():
            raise ImportError("no such module")
        assert gc.isenabled() is was_enabled
    finally:
        (gc.enable if before else gc.disable)()

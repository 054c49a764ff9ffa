"""The `rethink` command line: options (the option groups, declared once, and arguments -> typed values),
commands (one handler per command), parser (the argument parser). `main` is the entry point; `process_main` is
main as a whole process (the `rethink` command, `python -m rethink`)."""

from __future__ import annotations

import gc
import sys

from rethink.errors import Stopped, UserError

__all__ = ["build_parser", "main", "process_main", "quick_exit"]


def build_parser():
    from rethink.cli.parser import build_parser as build

    return build()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # a StoreError is one too (exit code 3)
        print(f"rethink: error: {e}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:  # preempted: the checkpoint is written, a new process resumes
        print(f"rethink: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rethink: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def process_main() -> int:
    """`main` as the whole process: its exit code, and a quick exit (`quick_exit`). Not in `main`, which tests
    call in one long process."""
    code = main()
    quick_exit(code)
    gc.freeze()  # where the quick exit is not safe: the last collections then skip what torch's import made
    return code


def quick_exit(code: int) -> None:
    """End the process now, skipping the interpreter's teardown, where nothing can be lost by it.

    After the atexit handlers, Python tears every module and object down one by one (0.3-0.4 s on a busy core
    once torch is imported, docs/performance.md; end to end within the VM's run-to-run spread) before the process ends, and the
    OS frees all of it at once anyway. Here the atexit handlers run (tqdm, logging, multiprocessing's), stdout
    and stderr are flushed, then the process exits with `code`. Returns instead (the normal exit follows) while a
    non-daemon thread still runs: Python waits for those, and so does this.
    """
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if run_exitfuncs is None or others:
        return
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)

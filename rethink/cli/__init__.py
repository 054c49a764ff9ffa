"""The `rethink` command line: options (the option groups, declared once, and arguments -> typed values),
commands (one handler per command), parser (the argument parser). `main` is the entry point; `process_main` is
main as a whole process (the `rethink` command, `python -m rethink`)."""

from __future__ import annotations

import gc
import sys

from rethink.errors import Stopped, UserError

__all__ = ["build_parser", "main", "process_main"]


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
    """`main` as the whole process: its exit code, and a quick exit. Python's last collections at shutdown walk
    every object torch's import created (0.4-0.5 s, a twentieth of a 3-epoch MLP run on the CPU); frozen, they
    are skipped, and nothing else changes (atexit handlers run, files are flushed and closed). Not in `main`,
    which tests call in one long process."""
    code = main()
    gc.freeze()
    return code

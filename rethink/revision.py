"""The code's revision, recorded with every result and every exported archive (torch-free)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path


@functools.cache
def git_revision() -> str:
    """The commit of the checkout the package runs from ('+dirty' with local changes to the package), else
    $RETHINK_GIT_REVISION (set when an image is built), else 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        if rev.returncode == 0 and top.returncode == 0 and here.parent == Path(top.stdout.strip()).resolve():
            dirty = subprocess.run(["git", "-C", str(here.parent), "status", "--porcelain", "--untracked-files=no",
                                    "--", "rethink"], capture_output=True, text=True, timeout=5)  # fmt: skip
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RETHINK_GIT_REVISION", "unknown")

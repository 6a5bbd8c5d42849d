"""Where a measured row came from: the commit of the code that produced it, for benchmark and experiment files."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def commit(where: str | Path = Path(__file__).parent) -> str:
    """The short commit of the checkout holding ``where`` (``+dirty`` when tracked files differ from it), else
    ``$VR1FAST_COMMIT`` (a tree copied without ``.git``), else ``unknown``."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                  check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                          "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("VR1FAST_COMMIT") or "unknown"

"""Where the public data (`../shared/data`: traces, profiles, rates) lives. Pure Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ENV_VAR = "FINESERVE_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(subdir: Optional[str] = None) -> Path:
    """The shared data root, or one of its subfolders ("traces", "profiles", "rates").

    If `$FINESERVE_DATA_DIR` is set: that data root (if it has no `subdir` folder the
    variable itself is taken to be that folder), nothing else. Otherwise
    `<repo>/../shared/data`, then `<repo>/shared/data`.
    Raises FileNotFoundError naming every place tried.
    """
    tried = []
    env = os.environ.get(ENV_VAR)
    candidates = []
    if env:  # an explicit setting is not second-guessed
        root = Path(env).expanduser()
        candidates.append(root / subdir if subdir else root)
        if subdir:
            candidates.append(root)
    else:
        for root in (_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data"):
            candidates.append(root / subdir if subdir else root)
    for c in candidates:
        tried.append(str(c))
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"shared data folder {subdir or ''!s} not found; tried {', '.join(tried)} "
        f"(set ${ENV_VAR} to the data root)"
    )


def data_file(subdir: str, name: str) -> Path:
    path = data_dir(subdir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path

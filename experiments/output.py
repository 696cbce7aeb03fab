"""Where experiments put their results."""

from __future__ import annotations

import json
import os


def write_json(output_dir: str, name: str, data) -> str:
    """Write `data` as indented JSON to OUTPUT_DIR/NAME (folders made), say so, return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")
    return path

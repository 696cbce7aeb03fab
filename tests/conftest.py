import atexit
import os
import shutil
import sys
import tempfile

# Tests import the packages from the checkout even when it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each test session compiles into its own cache folder (subprocesses inherit it): stored
# executables and profiles never come from an earlier session, whose tests may have patched
# code that the executable store's source digest cannot see.
_CACHE = tempfile.mkdtemp(prefix="fineserve_jax_test_cache_")
os.environ["FINESERVE_JAX_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest


@pytest.fixture(autouse=True)
def _no_gguf_conversion_cache(monkeypatch):
    """GGUF files written by tests must not leave converted copies in the user's model cache
    (tests/test_gguf_cache.py turns it on in a temporary folder)."""
    monkeypatch.setenv("FINESERVE_JAX_GGUF_CACHE", "0")

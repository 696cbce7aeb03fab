import os
import sys

# Tests import the packages from the checkout even when it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(autouse=True)
def _no_gguf_conversion_cache(monkeypatch):
    """GGUF files written by tests must not leave converted copies in the user's model cache
    (tests/test_gguf_cache.py turns it on in a temporary folder)."""
    monkeypatch.setenv("FINESERVE_JAX_GGUF_CACHE", "0")

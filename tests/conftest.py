"""Shared fixtures: tiny random models/SAEs (fast) and the embedded model (integration)."""

from __future__ import annotations

import pytest

from spare_tl.cache import REPO_ROOT

REFERENCE_CACHE = REPO_ROOT.parent / "shared" / "reference" / "spare-original-cache"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is fastest and robust to other processes on shared
    cores. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model():
    from spare_tl.testing import tiny_model as build

    return build(seed=0)


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct as a HookedSAETransformer (loaded once)."""
    from spare_tl import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def reference_cache():
    if not REFERENCE_CACHE.exists():
        pytest.skip(f"the paper's reference cache is not at {REFERENCE_CACHE}")
    return REFERENCE_CACHE

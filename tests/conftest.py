"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new random inputs on every developer run; on CI (CI=true) they replay a fixed sequence, so
# a landing is never decided by the luck of one draw (a crash found locally is fixed, then kept as a test).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")


def real_data(*parts: str) -> Path:
    """A path under $STLLM_DATA_ROOT; skips the test when the root or the path is missing (fails when CI=true)."""
    def missing(reason: str) -> None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data required on CI: {reason}")
        pytest.skip(reason)

    root = os.environ.get("STLLM_DATA_ROOT")
    if not root:
        missing("STLLM_DATA_ROOT is not set (point it at the shared data folder to run real-data tests)")
    path = Path(root, *parts)
    if not path.exists():
        missing(f"{path} does not exist (STLLM_DATA_ROOT={root})")
    return path


@pytest.fixture
def data_root() -> Path:
    """The real-data folder from $STLLM_DATA_ROOT (skip, or fail on CI, when it is missing)."""
    return real_data()


@pytest.fixture(scope="session")
def tiny_city():
    """A 6-sensor, 21-day synthetic city with weather (wind), deterministic."""
    from stllm.data.synthetic import make_city
    return make_city(n_nodes=6, n_days=21, seed=0)


@pytest.fixture
def tiny_config():
    """configs/tiny.yaml, with overrides: tiny_config(["backbone.name=tiny-llama"])."""
    from stllm.config import load_config
    root = Path(__file__).resolve().parent.parent
    return lambda overrides=(): load_config(root / "configs" / "tiny.yaml", list(overrides))

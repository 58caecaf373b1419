"""Shared test setup: one torch thread (2-core machines thrash otherwise) and no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "MOELENS_CACHE_DIR" not in os.environ:  # maps computed by tests stay out of the user's cache
    import tempfile

    os.environ["MOELENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="moelens-test-cache-")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    try:
        import torch
    except ImportError:  # analysis-only environments
        return
    torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path):
    """An empty trace store in a fresh temporary file."""
    from moelens import TraceStore

    return TraceStore(tmp_path / "traces.duckdb")

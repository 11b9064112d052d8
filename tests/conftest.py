from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama, build_tiny_t5  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["causal", "seq2seq"])
def tiny_model_path(request, tiny_llama_path, tiny_t5_path) -> Path:
    return tiny_llama_path if request.param == "causal" else tiny_t5_path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Never touch the user's real cache from tests.
    monkeypatch.setenv("PETMIX_CACHE", str(tmp_path / "petmix-cache"))


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "CL_Benchmark").is_dir():
        pytest.skip(f"benchmark data not present at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA

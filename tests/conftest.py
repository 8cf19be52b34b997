import os

import pytest

# Test runs never reach a model hub; the tiny checkpoint is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_moe_path() -> str:
    from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

    return str(build_tiny_moe())

"""Fixtures shared by the test modules: the tiny random-weight model (tests/helpers.py), written
once per module, and the torch thread count under pytest-xdist.

The fixtures are module-scoped, so every test file gets a model of its own (and, under
``--dist loadfile``, on its own worker). A module picks the weights' seed with a global
``TINY_MODEL_SEED = n`` (default 0), the way pytest's docs let a fixture read its module.
"""

from __future__ import annotations

import os

import pytest
import torch
from adadecode.runtime.hf_adapter import load_hf_config, load_stage_modules
from helpers import save_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    # Under xdist every worker is a process of its own: split the cores between them instead of
    # giving each worker all of them (4 threads on 2 busy cores crawl). Tests that pin threads
    # themselves (test_sampling_parity) still do.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight Llama directory (``helpers.TINY``: 6 layers, 96 tokens), seeded by the
    module's ``TINY_MODEL_SEED`` (default 0)."""
    seed = getattr(request.module, "TINY_MODEL_SEED", 0)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=seed)


@pytest.fixture(scope="module")
def head_stage(model_dir):
    """``model_dir``, its HF config, and the modules of the empty last stage ``[6, 6)``: the final
    norm and the LM head, what exit heads are built on."""
    config = load_hf_config(model_dir)
    return model_dir, config, load_stage_modules(model_dir, config, 6, 6, embed=False, head=True)

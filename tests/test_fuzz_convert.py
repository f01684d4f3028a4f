"""A short structure-aware fuzzing campaign of ``convert``, driven by hypothesis over the
mutations of ``tools/fuzz_convert.py``.

Each example takes one of the tool's three tiny transformers checkpoints (Mixtral and Qwen3-MoE
in one file, Qwen2-MoE sharded with an index; each with generation / tokenizer configs and a
tokenizer.json), applies 1-3 mutations (safetensors header length, header JSON, offsets, shapes,
dtypes, truncation, the shard index, config.json values, the generation / tokenizer files, a
file deleted) and has the tool's worker process (address-space limit, time limit per input)
convert it and, when it converts, load and run the result. The only acceptable outcomes are
success and a ConversionError naming the folder: no other exception, no MemoryError, no crash,
no hang. ``python tools/fuzz_convert.py`` runs the long campaign.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_convert", ROOT / "tools" / "fuzz_convert.py")
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

#: the tool's mutations (tools/fuzz_convert.py: random_op), as a hypothesis strategy
OPS = st.fixed_dictionaries({
    "op": st.sampled_from(list(fz.OPS)), "target": st.integers(0, 1 << 16),
    "pick": st.integers(0, 1 << 16), "vpick": st.integers(0, 63), "src": st.integers(0, 1 << 16),
    "action": st.sampled_from(fz.fc.JSON_ACTIONS), "kind": st.sampled_from(fz.fc.TEXT_KINDS)})


class _Fuzz:
    """The campaign's folder, base checkpoints and worker (a short repr: a failing example
    prints its arguments)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cache = folder / "bases"
        self.bases = fz.build_bases(self.cache)
        self.worker = fz.Worker(self.cache)
        self.n = 0

    def examine(self, base: str, ops: list) -> dict:
        self.n += 1
        slot = self.folder / f"in{self.n}"
        slot.mkdir()
        return self.worker.examine(fz.write_input(self.bases[base], ops, slot), timeout=120)

    def __repr__(self):
        return f"<convert fuzz campaign in {self.folder}>"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """A :class:`_Fuzz`; its worker is stopped at the end."""
    f = _Fuzz(tmp_path_factory.mktemp("fuzzconv"))
    yield f
    f.worker.close()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(base=st.sampled_from(list(fz.BASES)), ops=st.lists(OPS, min_size=1, max_size=3))
def test_mutated_checkpoints_are_refused_cleanly_or_convert_and_run(fuzz, base, ops):
    res = fuzz.examine(base, ops)
    assert res["outcome"] in ("ok", "refused"), json.dumps({"base": base, "ops": ops,
                                                            "result": res}, indent=1)


def test_the_campaign_reaches_conversion_and_the_runtime(fuzz):
    """Over a fixed-seed run, inputs are refused (for several reasons) and some convert and run
    (harmless mutations): the mutations neither all fail early nor all miss."""
    rng = random.Random(5)
    outcomes = collections.Counter()
    for _ in range(80):
        res = fuzz.examine(rng.choice(list(fz.BASES)),
                           [fz.random_op(rng) for _ in range(rng.randint(1, 3))])
        outcomes[res["outcome"]] += 1
        if res["outcome"] == "ok":
            assert res["stages"] == {"convert": "ok", "load": "ok", "forward": "ok"}
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes["ok"] >= 5 and outcomes["refused"] >= 20, outcomes

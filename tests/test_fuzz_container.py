"""A short structure-aware fuzzing campaign of the ``.zmoe`` reader and the runtime's decode
(format/SPEC.md §9), driven by hypothesis over the mutations of ``tools/fuzz_zmoe.py``.

Each example takes one of the tool's two tiny base containers (Huffman or zstd exponent chunks;
dense tensors of several dtypes, per-expert, stacked and F32/F16 experts), applies 1-3 mutations
(header fields, index values, stored bytes, JSON the writer never emits) with every CRC
recomputed, and has the tool's worker process (address-space limit, time limit per input) open,
verify, read and decode it every way the runtime does, the budgeted engine included. The only
acceptable outcomes are success and a ZmoeError naming the file: no other exception, no
MemoryError, no crash, no hang. ``python tools/fuzz_zmoe.py`` runs the long campaign.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_zmoe", ROOT / "tools" / "fuzz_zmoe.py")
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

#: the tool's mutations (tools/fuzz_zmoe.py: random_op), as hypothesis strategies
OPS = st.one_of(
    st.fixed_dictionaries({"op": st.just("index"), "pick": st.integers(0, 1 << 16),
                           "action": st.sampled_from(fz.INDEX_ACTIONS),
                           "vpick": st.integers(0, 63), "src": st.integers(0, 1 << 16)}),
    st.fixed_dictionaries({"op": st.just("bytes"), "piece": st.integers(0, 1 << 16),
                           "where": st.integers(0, 1 << 20), "kind": st.sampled_from(fz.BYTE_KINDS),
                           "value": st.integers(0, 255)}),
    st.fixed_dictionaries({"op": st.just("header"), "field": st.sampled_from(list(fz.HEADER_FIELDS)),
                           "vpick": st.integers(0, 63)}),
    st.fixed_dictionaries({"op": st.just("text"), "pick": st.integers(0, 1 << 16),
                           "kind": st.sampled_from(fz.TEXT_KINDS)}),
)


class _Fuzz:
    """The campaign's folder, base containers (bytes by codec) and worker (a short repr: a
    failing example prints its arguments)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bases = {c: fz.make_base(folder / f"base-{c}.zmoe", c).read_bytes()
                      for c in ("huffman", "zstd")}
        self.worker = fz.Worker(memory_mb=3072)

    def __repr__(self):
        return f"<fuzz campaign in {self.folder}>"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """A :class:`_Fuzz`; its worker is stopped at the end."""
    f = _Fuzz(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.worker.close()


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(codec=st.sampled_from(["huffman", "zstd"]), ops=st.lists(OPS, min_size=1, max_size=3))
def test_mutated_containers_are_refused_cleanly_or_decode(fuzz, codec, ops):
    path = fuzz.folder / "input.zmoe"
    path.write_bytes(fz.build(fuzz.bases[codec], ops))
    res = fuzz.worker.examine(path, timeout=60)
    assert res["outcome"] in ("ok", "refused"), json.dumps({"codec": codec, "ops": ops,
                                                            "result": res}, indent=1)


def test_the_campaign_reaches_every_stage(fuzz):
    """The mutations get past the checksums: over a fixed-seed run, inputs are refused when
    opened and later (by verify or the decoders), and some decode (harmless mutations)."""
    import collections
    import random
    rng = random.Random(3)
    stages, outcomes = collections.Counter(), collections.Counter()
    for i in range(120):
        path = fuzz.folder / "campaign.zmoe"
        path.write_bytes(fz.build(fuzz.bases[("huffman", "zstd")[i % 2]],
                                  [fz.random_op(rng) for _ in range(rng.randint(1, 3))]))
        res = fuzz.worker.examine(path, timeout=60)
        outcomes[res["outcome"]] += 1
        if res["outcome"] == "refused":
            stages[next(s for s, c in res["stages"].items() if c not in ("ok", "skipped"))] += 1
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    assert outcomes["ok"] >= 5 and stages["open"] >= 30 and stages["verify"] >= 1, (outcomes, stages)

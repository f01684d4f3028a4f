"""The runtime's own memory under ``--memory-limit`` (zipmoe_rt/engine/footprint.py): the
kernel warm-up covers every kernel a run then uses, dropping LLVM's pages gives memory back and
leaves the kernels (and later compiles) working, and the steady footprint a child measures.
Each check runs in a fresh interpreter: this test process has long loaded every kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_api import make_chat_model
from tiny_models import SPECS

MB = 10**6


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_moe_dir, tmp_path_factory) -> Path:
    return make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("footprint") / "tiny")


def child(code: str, tmp_path, *args) -> dict:
    """Run ``code`` in a fresh interpreter (``args`` in ``sys.argv[1:]``, its own cache
    folder); its last stdout line is JSON."""
    env = dict(os.environ, ZIPMOE_RT_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


RUN_AFTER_LOAD = """
    import json, sys
    import numpy as np
    from numba.core.registry import CPUDispatcher
    import zipmoe_rt

    def signatures():
        out = {}
        for name, mod in list(sys.modules.items()):
            if name.startswith("zipmoe_rt") and mod is not None:
                for k, v in list(vars(mod).items()):
                    if isinstance(v, CPUDispatcher):
                        out[f"{name}.{k}"] = [str(s) for s in v.signatures]
        return out

    path, policy, resident = sys.argv[1:]
    m = zipmoe_rt.load(path, memory_limit="4GB", policy=policy, resident=resident, context=600)
    before = signatures()
    c = m.net.new_cache()
    m.net.forward(np.arange(300, dtype=np.int64) % 50, c)      # parallel attention's size
    text = m.generate("hello there", max_tokens=6)
    after = signatures()
    new = {k: v for k, v in after.items() if v != before.get(k, [])}
    print(json.dumps({"new": new, "loaded": sum(map(len, before.values())), "text": text}))
"""


@pytest.mark.parametrize("policy, resident", [("zip-lru", "full"), ("zip-lru", "compressed")])
def test_warm_up_loads_every_kernel_the_run_uses(tiny_zmoe, tmp_path, policy, resident):
    """Under a memory limit, loading warms the kernels up before the weights; a prefill of
    the parallel attention's size and a decode afterwards load (or compile) no new kernel."""
    got = child(RUN_AFTER_LOAD, tmp_path, tiny_zmoe, policy, resident)
    assert got["new"] == {}, got["new"]
    assert got["loaded"] >= 10 and got["text"]


def test_drop_cold_library_pages_gives_memory_back_and_kernels_still_run(tmp_path):
    got = child("""
        import json
        import numpy as np
        from numba import njit
        from zipmoe_rt.engine.footprint import drop_cold_library_pages
        from zipmoe_rt.util import status_bytes

        @njit
        def f(a):
            return (a * 3).sum()
        assert f(np.arange(10)) == 135
        file0 = status_bytes("RssFile")
        dropped = drop_cold_library_pages()
        file1 = status_bytes("RssFile")
        again = int(f(np.arange(10)))                  # the compiled kernel

        @njit
        def g(a):                                      # a compile after the drop: LLVM again
            return (a + 1).max()
        print(json.dumps({"file0": file0, "file1": file1, "dropped": dropped,
                          "again": again, "g": int(g(np.arange(10))),
                          "none": drop_cold_library_pages(("no-such-library",))}))
    """, tmp_path)
    assert got["again"] == 135 and got["g"] == 10 and got["none"] == 0
    assert got["dropped"] >= 10 * MB, got
    assert got["file0"] - got["file1"] >= 0.9 * got["dropped"], got


def test_steady_footprint_in_a_child(tiny_zmoe, tmp_path):
    """What ``--memory-limit`` subtracts: the steady RSS after the release is below the
    warm-up's peak by at least the LLVM pages dropped; the anonymous part is within it."""
    got = child(f"""
        import json
        from zipmoe_rt.engine.footprint import steady_footprint
        print(json.dumps(steady_footprint({str(tiny_zmoe)!r})))
    """, tmp_path)
    assert got["dropped"] >= 10 * MB, got
    assert 0 < got["anon"] < got["steady"] <= got["peak"] - got["dropped"] + 4 * MB, got


@pytest.mark.parametrize("name", list(SPECS))
def test_warm_up_runs_for_every_family(name):
    """The warm-up's tiny models (decoded, then mixed with compute-form experts where the
    family's experts are gate/up/down) run for every family, and leave the parallel
    thresholds as they were."""
    from types import SimpleNamespace

    from test_families import _hf_config
    from zipmoe_rt.engine import footprint as F
    from zipmoe_rt.families import get_architecture
    from zipmoe_rt.kernels import attention, linear

    _, _, d = _hf_config(name)
    hp = get_architecture(d).typed_hparams().to_hparams()
    before = (linear.PAR_MIN_WORK, attention.ATTN_PAR_MIN)
    F.warm_up(SimpleNamespace(hparams=hp, layouts={}))
    assert (linear.PAR_MIN_WORK, attention.ATTN_PAR_MIN) == before
    tiny = F.TinySource(hp, packed=True)
    if tiny._roles:                  # (a tiny model of a family's leading dense layers has none)
        from zipmoe_rt.models.packed import is_packed
        assert is_packed(tiny.expert(0, 1)) == (set(tiny._roles) == {"gate", "up", "down"})
        assert not is_packed(tiny.expert(0, 0))

"""tools/compare_llamacpp.py without llama.cpp: the environment its children get (as it was
before zipmoe_rt was imported, not with the OMP_WAIT_POLICY/KMP_BLOCKTIME that importing
zipmoe_rt sets), what it reports when llama.cpp is not installed, and a fake ``llama_cpp``
child that reports the environment and settings it ran with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "compare_llamacpp.py"

FAKE_LLAMA = '''
"""A stand-in for llama-cpp-python: argmax of the next token is (last id + 1) % 8."""
import ctypes, os
__version__ = "0.0-fake"
SEEN_ENV = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
class _Ctx:
    def __init__(self, n):
        self.buf = (ctypes.c_float * n)()
    def get_logits_ith(self, i):
        return ctypes.cast(self.buf, ctypes.POINTER(ctypes.c_float))
class Llama:
    def __init__(self, model_path, **kw):
        self.kw, self._ctx = kw, _Ctx(8)
    def tokenize(self, text, add_bos=False, special=False):
        return [1, 2, 3]
    def n_vocab(self):
        return 8
    def reset(self):
        pass
    def eval(self, ids):
        for i in range(8):
            self._ctx.buf[i] = 0.0
        self._ctx.buf[(ids[-1] + 1) % 8] = 1.0
'''


def run_py(code: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def base_env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "format")]
                                        + [x for x in [os.environ.get("PYTHONPATH")] if x])
    env.update(kw)
    return env


PROBE = """
import importlib.util, json, os, subprocess, sys
spec = importlib.util.spec_from_file_location("compare", "tools/compare_llamacpp.py")
tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
import zipmoe_rt.kernels          # sets OMP_WAIT_POLICY / KMP_BLOCKTIME in this process
child = subprocess.run([sys.executable, "-c", "import os, json; print(json.dumps("
                        "{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'KMP_BLOCKTIME')}))"],
                       env=tool.child_env(), capture_output=True, text=True)
print(json.dumps({"here": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")},
                  "child": json.loads(child.stdout), "text": tool.omp_settings(tool.LAUNCH_ENV)}))
"""


def test_children_get_the_environment_from_before_zipmoe_rt():
    got = run_py(PROBE, base_env())
    assert got["here"] == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert got["child"] == {"OMP_WAIT_POLICY": None, "KMP_BLOCKTIME": None}
    assert "OMP_WAIT_POLICY unset (OpenMP default)" in got["text"]


def test_a_users_own_setting_is_kept_and_printed():
    got = run_py(PROBE, base_env(OMP_WAIT_POLICY="ACTIVE"))
    assert got["child"] == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": None}
    assert got["text"].startswith("OMP_WAIT_POLICY=ACTIVE")


@pytest.fixture
def tool(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_llamacpp_t", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llama_cpp_not_installed_is_said_clearly(tool, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    p = tool.Paths(tmp_path / "cache")
    found = tool.find_llama(p)
    assert found["python"] is None and found["binaries"] == {}
    assert "no llama-bench or llama-cli on PATH" in found["note"]
    assert "no Python with llama_cpp" in found["note"]

    def no_network(_p):
        raise RuntimeError("command failed (exit 1): pip download llama-cpp-python")
    # (patched where ensure_llama looks it up: the tool's set-up module)
    monkeypatch.setattr(sys.modules["llamacpp_setup"], "ensure_sdist", no_network)

    class A:
        llama_python, cmake_args = None, ""
    with pytest.raises(RuntimeError) as e:
        tool.ensure_llama(p, A)
    msg = str(e.value)
    assert msg.startswith("llama.cpp is not installed here") and "--llama-python" in msg
    assert "pip download" in msg
    A.llama_python = str(tmp_path / "nope" / "python")
    with pytest.raises(RuntimeError, match="cannot import llama_cpp"):
        tool.ensure_llama(p, A)


def test_fake_llama_child_runs_with_the_launch_environment(tool, tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "llama-bench").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "llama-bench").chmod(0o755)
    py = tmp_path / "llama-python"               # a Python that imports the fake llama_cpp
    py.write_text(f"#!/bin/sh\nPYTHONPATH={fake}:{REPO}:$PYTHONPATH exec {sys.executable} "
                  f"\"$@\"\n")
    py.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    for k in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME"):
        monkeypatch.delitem(tool.LAUNCH_ENV, k, raising=False)
    import zipmoe_rt.kernels  # noqa: F401  (this process has the runtime's settings)
    assert os.environ["OMP_WAIT_POLICY"] in ("PASSIVE", "ACTIVE")
    found = tool.find_llama(tool.Paths(tmp_path / "cache"), str(py))
    assert found["python"] == str(py) and found["version"] == "0.0-fake"
    assert found["binaries"] == {"llama-bench": str(bindir / "llama-bench")}
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    r = subprocess.run([str(py), str(TOOL), "_llama-bench", "--model", str(model), "--threads",
                        "2", "--prompt-ids", "1,2,3", "--prompt-text", "abc", "--n-gen", "5",
                        "--reps", "2"], env=tool.child_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["omp"]["OMP_WAIT_POLICY"] is None and res["omp"]["KMP_BLOCKTIME"] is None
    assert res["settings"]["n_threads"] == 2 and res["settings"]["use_mmap"] is True
    assert res["prompt_tokens_match"] is True
    assert [x["tokens"] for x in res["runs"]] == [[4, 5, 6, 7, 0]] * 2
    row = {"name": "llama.cpp-mmap-none", "settings": res["settings"], "omp": res["omp"]}

    class A:
        zipmoe_only, cmake_args = False, "-DGGML_NATIVE=ON"
    text = tool.settings_text([row], A)
    assert "llama.cpp-mmap-none: n_ctx=512" in text and "n_threads=2" in text
    assert "OMP_WAIT_POLICY unset (OpenMP default)" in text


def test_fake_llama_child_times_a_prefill_and_the_pp_table(tool, tmp_path):
    """``--pp-ids``: each repetition also evaluates those ids in one call (pp_s, pp_tps); the
    pp table gives each program's median and the ratio against llama.cpp's."""
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
    py = tmp_path / "llama-python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={fake}:{REPO}:$PYTHONPATH exec {sys.executable} "
                  f"\"$@\"\n")
    py.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    r = subprocess.run([str(py), str(TOOL), "_llama-bench", "--model", str(model), "--threads",
                        "2", "--prompt-ids", "1,2,3", "--n-gen", "3", "--reps", "2",
                        "--pp-ids", ",".join(["5"] * 40)], env=tool.child_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
    assert len(runs) == 2
    for x in runs:
        assert x["pp_s"] > 0 and x["pp_tps"] == pytest.approx(40 / x["pp_s"])
    rows = [{"program": "llama.cpp", "pp_median": 50.0, "pp_tps": [40.0, 50.0, 60.0]},
            {"program": "zipmoe-rt", "pp_median": 80.0, "pp_tps": [80.0, 70.0, 90.0]},
            {"program": "zipmoe-rt", "limit": 600}]
    text = tool.pp_table(rows, 512)
    assert "pp512 tokens/s (median)" in text
    assert "| llama.cpp | none | 50.0 | 40.0, 50.0, 60.0 | 1.00 |" in text
    assert "| zipmoe-rt | none | 80.0 | 80.0, 70.0, 90.0 | 1.60 |" in text
    assert tool.pp_table([{"program": "llama.cpp"}], 512) == ""

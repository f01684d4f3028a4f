"""Compile every CUDA C source of the runtime with NVRTC, on any machine (no GPU, no CuPy):
a syntax or type error in a kernel shows here, before a GPU machine runs it.

The sources are the ``SOURCE`` strings of ``zipmoe_rt/kernels/cuda_*src.py`` and
``zipmoe_rt/backends/cuda_experts.py`` (read from the files, so nothing imports CuPy), each
compiled with the options the runtime passes to ``cupy.RawModule`` (``-std=c++14``), the staged
segment decoder once per variant of ``cuda_segdec.VARIANTS`` (its ``-D`` options), for each
``--arch`` (default ``compute_90``, the H100/H200; ``compute_70`` is the oldest ``__nanosleep``
needs). NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` (or ``-cu13``) wheel or ``--lib``.

    pip install nvidia-cuda-nvrtc-cu12
    python tools/check_cuda_sources.py [--arch compute_90 --arch compute_70] [--lib libnvrtc.so]

Prints one line per source, variant and architecture (OK, or the compiler's log) and exits 1
when any failed. It checks that the kernels compile, not what they compute: the GPU tests
(``tests/test_gpu*.py``) do that on a GPU machine.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import glob
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(glob.glob(str(ROOT / "zipmoe_rt" / "kernels" / "cuda_*src.py"))) + [
    str(ROOT / "zipmoe_rt" / "backends" / "cuda_experts.py")]


def module_constant(path, name):
    """The literal value of module-level ``name`` in the Python file ``path`` (not imported)."""
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{path}: no literal {name}")


def segdec_defines() -> dict:
    """``{variant: [-D options]}`` of ``zipmoe_rt/backends/cuda_segdec.py``'s VARIANTS."""
    v = module_constant(ROOT / "zipmoe_rt" / "backends" / "cuda_segdec.py", "VARIANTS")
    return {k: [f"-DSD_T={t}", f"-DSD_ROUND={r}", f"-DSD_SMEM_TAB={m}"]
            for k, (t, r, m) in v.items()}


def find_nvrtc(lib: str | None):
    """The NVRTC shared library: ``lib``, else the one of an installed nvidia-cuda-nvrtc wheel.

    Raises:
        SystemExit: none found (names the wheel to install).
    """
    names = [lib] if lib else []
    try:
        import nvidia.cuda_nvrtc as pkg
        for base in pkg.__path__:
            names += sorted(glob.glob(str(Path(base) / "lib" / "libnvrtc.so*")))
    except ImportError:
        pass
    names += ["libnvrtc.so"]
    for n in names:
        if n and "builtins" not in n and ".alt." not in n:
            try:
                return ctypes.CDLL(n)
            except OSError:
                continue
    raise SystemExit("error: NVRTC not found: pip install nvidia-cuda-nvrtc-cu12, or give --lib")


def compile_source(nvrtc, src: str, opts: list) -> tuple[bool, str]:
    """(compiled, log) of ``src`` under ``opts``."""
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None):
        return False, "nvrtcCreateProgram failed"
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(max(n.value, 1))
    nvrtc.nvrtcGetProgramLog(prog, buf)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, buf.value.decode(errors="replace").strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="NVRTC -arch value (repeatable)")
    ap.add_argument("--lib", help="path of libnvrtc.so")
    a = ap.parse_args(argv)
    nvrtc = find_nvrtc(a.lib)
    failed = 0
    for path in SOURCES:
        src = module_constant(path, "SOURCE")
        variants = segdec_defines() if path.endswith("cuda_segdec_src.py") else {"": []}
        for arch in a.arch or ["compute_90"]:
            for name, defs in variants.items():
                ok, log = compile_source(nvrtc, src, ["-std=c++14", f"-arch={arch}", *defs])
                log = "\n".join(x for x in log.splitlines() if "deprecated" not in x)
                label = f"{Path(path).relative_to(ROOT)}{' ' + name if name else ''} {arch}"
                print(f"{label}: {'OK' if ok else 'FAILED'}" + (f"\n{log}" if log else ""))
                failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The converter's rules for low-precision checkpoints: FP8 E4M3 weights with per-block F32
``weight_scale_inv`` (DeepSeek-V3's release format; transformers
``integrations/finegrained_fp8.py``), allowed when config.json's ``quantization_config`` gave
the model an ``fp8_block_size`` (zipmoe_rt/families/lowprec.py); and MXFP4 expert tensors
(gpt-oss's release: ``<expert weight>_blocks`` U8 [E, out, in / 32, 16] and ``_scales`` U8
[E, out, in / 32], transformers ``integrations/mxfp4.py``), with a ``quantization_config`` of
``quant_method: mxfp4``: stored in their expert blocks as roles ``<proj>_blocks`` (encoding
``mxfp4``, the source bytes) and ``<proj>_scales`` (U8 bit-planes), format/SPEC.md §5.4.

Every F8_E4M3 tensor must come with its ``<name>_scale_inv`` (F32, one value per block:
``[ceil(rows / bm), ceil(cols / bn)]``, with a leading expert axis for a stacked tensor), and
every such scale with its weight. An expert's scales go into its expert block with the role
``<role>_scale`` (format/SPEC.md §4), so a runtime reads an expert's weights and scales in one
read; dense scales stay dense tensors.
"""
from __future__ import annotations

from ..families.base import ExpertRef
from .errors import ConversionError

FP8 = "F8_E4M3"
SCALE = "_scale_inv"
#: safetensors dtypes of the weights the runtime's kernels compute with
WEIGHT_DTYPES = ("BF16", "F16", "F32")


def weight_dtypes(hp: dict) -> tuple:
    """The weight dtypes a model with stored hyper-parameters ``hp`` may have: F8_E4M3 too when
    it has ``fp8_block_size``."""
    return WEIGHT_DTYPES + ((FP8,) if hp.get("fp8_block_size") else ())


def check_dtype(t, hp: dict) -> None:
    """A tensor the model computes with has a dtype the runtime takes.

    Raises:
        ConversionError: naming the file, the tensor and the dtype (and config.json's
            quantization_config for an FP8 tensor of a model without one).
    """
    allowed = weight_dtypes(hp)
    if t.dtype not in allowed:
        why = (" (F8_E4M3 only with a quantization_config of quant_method fp8 in config.json)"
               if t.dtype == FP8 else "")
        raise ConversionError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}; the model's "
                              f"weights must be {', '.join(allowed)}{why}")


#: suffixes of MXFP4 expert tensors and of their roles
MXFP4_SUFFIXES = ("_blocks", "_scales")


def piece_encoding(role: str) -> str | None:
    """The encoding of an expert piece of ``role``: ``mxfp4`` for MXFP4 blocks, ``bitplane``
    (exponent-only U8) for their scales, None (the writer's choice) otherwise."""
    if role.endswith("_blocks"):
        return "mxfp4"
    if role.endswith("_scales"):
        return "bitplane"
    return None


def _attach_mxfp4(arch, hp: dict, ckpt, dense: list, experts: dict) -> None:
    """Move MXFP4 expert tensors from ``dense`` into their experts (see the module docstring).

    Raises:
        ConversionError: MXFP4 tensors without ``quant_method: mxfp4`` in config.json, a dtype
            other than U8, or a shape other than the weight's [E, out, in / 32, 16] /
            [E, out, in / 32] (file, tensor and shapes named).
    """
    moved = []
    for name in dense:
        suffix = next((s for s in MXFP4_SUFFIXES if name.endswith(s)), None)
        ref = None if suffix is None else arch.expert_tensor(name[:-len(suffix)])
        if ref is None or ref.layer >= hp["num_hidden_layers"] or not ref.role.endswith("_cols"):
            continue
        t = ckpt.tensors[name]
        q = arch.config.get("quantization_config") or {}
        if not isinstance(q, dict) or q.get("quant_method") != "mxfp4":
            raise ConversionError(f"{t.file}: tensor {name!r} is an MXFP4 expert tensor, but "
                                  f"config.json has no quantization_config with quant_method "
                                  f"mxfp4")
        E, h, i = hp["num_experts"], hp["hidden_size"], hp["moe_intermediate_size"]
        rows, cols = (2 * i, h) if ref.role.startswith("gate_up") else (h, i)
        want = (E, rows, cols // 32, 16) if suffix == "_blocks" else (E, rows, cols // 32)
        if t.dtype != "U8" or tuple(t.shape) != want or cols % 32:
            raise ConversionError(f"{t.file}: tensor {name!r} is {t.dtype} {list(t.shape)}; "
                                  f"MXFP4 {suffix[1:]} of a [{rows}, {cols}] projection are U8 "
                                  f"{list(want)} (in / 32 groups of 32 weights)")
        role = ref.role[:-len("_cols")] + suffix
        for e in range(E):
            experts.setdefault((ref.layer, e), []).append((name, ExpertRef(ref.layer, None, role)))
        moved.append(name)
    dense[:] = [n for n in dense if n not in moved]


def _grid(shape, block) -> tuple:
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def is_used_scale(name: str, ckpt, arch=None) -> bool:
    """Whether ``name`` is the ``weight_scale_inv`` of an F8_E4M3 tensor of ``ckpt``, or (with
    the family ``arch``) an MXFP4 ``_blocks`` / ``_scales`` tensor of an expert weight."""
    base = ckpt.tensors.get(name[:-len(SCALE)]) if name.endswith(SCALE) else None
    if base is not None and base.dtype == FP8:
        return True
    suffix = next((s for s in MXFP4_SUFFIXES if name.endswith(s)), None)
    return arch is not None and suffix is not None and \
        arch.expert_tensor(name[:-len(suffix)]) is not None


def attach_scales(arch, hp: dict, ckpt, dense: list, experts: dict) -> None:
    """Check every FP8 weight and its scale, and move the scales of expert tensors from
    ``dense`` into their experts (``experts[(layer, e)]`` gets ``(name, ExpertRef(layer, e or
    None, role + "_scale"))``). Changes ``dense`` and ``experts`` in place.

    Raises:
        ConversionError: an F8_E4M3 tensor without its F32 scale, a scale without an F8_E4M3
            weight, or a scale whose shape is not the block grid (file, tensor and shapes named).
    """
    block = hp.get("fp8_block_size")
    for t in ckpt:
        if t.dtype == FP8:
            s = ckpt.tensors.get(t.name + SCALE)
            if s is None or s.dtype != "F32":
                raise ConversionError(f"{t.file}: tensor {t.name!r} is F8_E4M3 but the "
                                      f"checkpoint has no F32 {t.name + SCALE!r} (its block "
                                      f"scales)")
            if not block or len(t.shape) < 2:
                raise ConversionError(f"{t.file}: tensor {t.name!r}: F8_E4M3 needs a 2-D weight "
                                      f"and config.json's quantization_config (quant_method fp8)")
            want = _grid(t.shape, block)
            if tuple(s.shape) != want:
                raise ConversionError(f"{s.file}: tensor {s.name!r} has shape {list(s.shape)}, "
                                      f"but {t.name!r} {list(t.shape)} in blocks of {block} "
                                      f"needs {list(want)}")
        elif t.name.endswith(SCALE) and t.name[:-len(SCALE)] in ckpt.tensors:
            base = ckpt.tensors[t.name[:-len(SCALE)]]
            if base.dtype != FP8:
                raise ConversionError(f"{t.file}: tensor {t.name!r} scales {base.name!r}, which "
                                      f"is {base.dtype}, not F8_E4M3")
    moved = set()
    for name in dense:
        if not name.endswith(SCALE):
            continue
        ref = arch.expert_tensor(name[:-len(SCALE)])
        if ref is None or ref.layer >= hp["num_hidden_layers"]:
            continue
        es = range(hp["num_experts"]) if ref.expert is None else [ref.expert]
        for e in es:
            experts.setdefault((ref.layer, e), []).append(
                (name, ExpertRef(ref.layer, ref.expert, ref.role + "_scale")))
        moved.add(name)
    dense[:] = [n for n in dense if n not in moved]
    _attach_mxfp4(arch, hp, ckpt, dense, experts)

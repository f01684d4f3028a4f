"""The tensors an expert block holds, by role (format/SPEC.md §4), and the shapes each role
must have: one table for the converter, the container checks (``engine/layout.py``) and the
runtime's assembly of an expert (:func:`zipmoe_rt.models.weights.assemble_expert`).

Importable without torch and Numba.
"""
from __future__ import annotations

#: the role sets an expert block may hold (format/SPEC.md §4): separate gate / up [I, H] and
#: down [H, I]; transformers' fused ``gate_up`` [2I, H] (gate rows, then up rows) and down;
#: gpt-oss's in x out slices ``gate_up_cols`` [H, 2I] (gate and up interleaved column by
#: column) and ``down_cols`` [I, H] with their biases ``gate_up_bias`` [2I] (interleaved the
#: same way) and ``down_bias`` [H].
EXPERT_ROLE_SETS = ({"gate", "up", "down"}, {"gate_up", "down"},
                    {"gate_up_cols", "gate_up_bias", "down_cols", "down_bias"},
                    # gpt-oss's MXFP4 release: each [out, in] projection as blocks U8
                    # [out, in / 32, 16] and e8m0 scales U8 [out, in / 32] (engine/lowprec.py)
                    {"gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks",
                     "down_scales", "down_bias"})


def expert_shapes(roles: dict) -> dict:
    """The shape each role of ``roles`` (role -> shape tuple) must have, from the down
    projection's: ``{role: shape}`` (``GptOssExperts``: ``down_cols`` [I, H] gives
    ``gate_up_cols`` [H, 2I], ``gate_up_bias`` [2I], ``down_bias`` [H]; else ``down`` [H, I]
    gives ``gate`` / ``up`` [I, H] or ``gate_up`` [2I, H]).

    Raises:
        KeyError: no down projection among the roles.  ValueError: it is not 2-D.
    """
    if "down_blocks" in roles and "gate_up_blocks" in roles:   # MXFP4 (gpt-oss release)
        d = tuple(roles["down_blocks"])
        if len(d) != 3 or d[2] != 16:
            raise ValueError(f"down_blocks {list(d)} is not [hidden, intermediate / 32, 16]")
        h, g = d[0], d[1]
        i = 32 * g
        if h % 32:
            raise ValueError(f"down_blocks {list(d)}: hidden {h} is not a multiple of 32 (MXFP4)")
        return {"gate_up_blocks": (2 * i, h // 32, 16), "gate_up_scales": (2 * i, h // 32),
                "gate_up_bias": (2 * i,), "down_blocks": (h, g, 16), "down_scales": (h, g),
                "down_bias": (h,)}
    if "down_cols" in roles:
        d = tuple(roles["down_cols"])
        if len(d) != 2:
            raise ValueError(f"down_cols {list(d)} is not [intermediate, hidden]")
        i, h = d
        return {"gate_up_cols": (h, 2 * i), "gate_up_bias": (2 * i,), "down_cols": (i, h),
                "down_bias": (h,)}
    d = tuple(roles["down"])
    if len(d) != 2:
        raise ValueError(f"down {list(d)} is not [hidden, intermediate]")
    h, i = d
    if "gate_up" in roles:
        return {"gate_up": (2 * i, h), "down": (h, i)}
    return {"gate": (i, h), "up": (i, h), "down": (h, i)}

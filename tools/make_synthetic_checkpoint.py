#!/usr/bin/env python
"""Write a synthetic HF MoE checkpoint of realistic shape, for expert-offloading benchmarks.

    python tools/make_synthetic_checkpoint.py OUT_DIR --arch qwen1.5-moe --layers 6 \\
        [--vocab smollm] [--skew 0.08] [--locality 0.30] [--seed 0]

Shapes (``--arch``): every family of the registry (``zipmoe_rt/families``) has a preset of a
released model: ``qwen1.5-moe`` (the default; Qwen1.5-MoE-A2.7B, ``Qwen2MoeForCausalLM``:
hidden 2048, 60 experts of 1408, top-4 without renormalisation, a shared expert of 5632 gated by
``sigmoid(shared_expert_gate(x))``, 16/16 heads with q/k/v bias, RMSNorm eps 1e-6, RoPE theta 1e6),
``qwen3-moe`` (Qwen3-30B-A3B: 128 experts of 768, top-8 renormalised, 32/4 heads of 128 with
q/k RMSNorm) and ``mixtral`` (Mixtral-8x7B: 8 experts of 14336, top-2), at full or reduced depth
(``--layers``), in BF16, as ~2 GB safetensors shards with ``model.safetensors.index.json``. The
tensor names, shapes and config.json come from the family's registry entry (its tensor specs in
the Hub layout and :meth:`~zipmoe_rt.families.Family.hf_config`); everything is written into a
temporary sibling folder renamed to OUT_DIR when complete.

Weights. Every value is resampled from the real SmolLM2-135M-Instruct weights
(``synthetic_pools.py``): each GGUF tensor kind (MLP gate / up / down, attention q / k / v / o,
embedding, the two norms) is dequantised once to float32 and pooled (2^20 values per kind, drawn
uniformly from all 30 layers; the embedding's from 8192 random rows). A synthetic tensor is filled
with i.i.d. draws from the pool of the matching kind (experts, shared expert and dense MLPs from
the MLP pools, biases and the ``shared_expert_gate`` from the q/k/v and gate pools, lm_head from
the embedding pool, see "Decoding" below), times ``sqrt(source fan-in / target fan-in)`` (so
activations keep SmolLM2's per-layer gain) times a per-tensor log-normal jitter
``exp(N(0, --jitter))``, rounded to BF16 (nearest even). A scale moves the exponent histogram by a
fraction of a binade without changing its shape, so the synthetic experts keep the real exponent
entropy (~2.6 bits, printed at the end next to the real tensors'). The i.i.d. draw keeps every
order-0 statistic (the one the exponent coder sees) but not row/column structure. Embedding rows
are a common offset vector (drawn from the real embedding's mean vector) plus draws from the real
centred embedding values, which reproduces the real embedding's strong common-mode direction.

Router (``synthetic_router.py``). Real routers give skewed expert popularity (the top expert of a
Qwen1.5-MoE layer gets ~8 % of the selections at batch 1, ranks decay smoothly) with locality
between consecutive tokens. The router logits are ``beta_e * <h, u>/mu + <w_e, h>``: ``u`` is the
common-mode direction of the layer's router inputs ``h`` (the post-attention RMSNorm output), ``mu``
the mean of ``<h, u>``, so the first term acts as a per-expert bias; ``beta_e = -alpha * sigma *
ln(rank_e)`` (a Zipf law over a random ranking of the experts of each layer), and ``w_e`` are
token-dependent directions orthogonal to ``u``, scaled so that ``<w_e, h>`` has standard deviation
``sigma`` (``--router-scale``). Locality comes from where ``w_e`` points: the top principal
components of ``h`` are context features that attention keeps averaging over the prefix (slow),
directions outside them carry mostly the current token (fast); one tilt parameter in [-1, 1] moves
``w_e`` from the fast directions (-1) over equal weights on the whitened top PCs (0) to the slowest
PCs (+1). Because ``h`` depends on the model itself, the tool runs the model it is writing, layer
by layer as it designs it (``synthetic_calibrate.py``), with the runtime's own model code (``zipmoe_rt.models.build_model``
over an in-memory weight source, float32 on the exact BF16 weights, which reproduces
transformers' routing decisions) on a calibration batch of real text (``--calib-seqs`` x
``--calib-len`` tokens of Project Gutenberg books tokenised with the SmolLM2 tokenizer, ids mod
vocab; random Zipf-distributed ids when no corpus is found). Per layer, ``alpha`` is fitted so
that the most popular expert gets ``--skew`` of the calibration selections, and the tilt (with
``alpha`` refitted at each step) so that an expert selected at token t is selected again at t+1
with probability ``--locality``, measured on the odd calibration sequences (the PCs come from the
even ones). ``--zipf A`` fixes ``alpha`` instead. Per-layer statistics (top-1 share, share by
rank, repeat probability, expert counts) are saved in ``synthetic.json``.

Knobs: ``--skew`` target top-1 share (default per preset, or the middle of the valid range
``(1/E, 1/k]`` for a shape the preset's value does not fit, such as ``--tiny``; uniform is
1/E); ``--locality`` target P(expert selected at t+1 | selected at t) (default 0.30; uniform
routing gives k/E, 0.067 for Qwen1.5-MoE); ``--zipf`` fixed Zipf exponent; ``--router-scale``
sigma; ``--seed`` (everything is deterministic given the seed and the inputs). The reachable
locality range per layer is saved (``repeat_range_at_tilt_limits``); for the Qwen1.5-MoE shape
with 128-token contexts it is about 0.23..0.34 at the bottom and 0.31..0.7 from layer 2 on, so
the default 0.30 is clamped to 0.31-0.34 in most deeper layers (a note lists them). Measured on
the Qwen1.5-MoE shape (6 layers, defaults, routing in transformers in BF16 on held-out books):
mean top-1 share 0.090, mean repeat probability 0.32. The ``qwen3-moe`` and ``mixtral`` default
skews are guesses, not measurements.

Decoding: the lm_head rows have the final hidden states' common direction projected out (else
that direction alone picks the same argmax token at every step and generation loops on one
token); greedy generation then gives gibberish of mostly distinct tokens.

Tokenizer. With ``--vocab smollm`` (the default: the runtime needs a tokenizer for prompts) the
vocabulary is SmolLM2's 49152 and the SmolLM2 tokenizer.json, tokenizer_config.json with its
ChatML template and generation_config.json with its eos ids are written. ``--vocab full`` keeps
the preset's vocabulary and ``--vocab N`` any size; no tokenizer is written then.

Memory: one layer's tensors at a time (its experts included) plus the calibration batch.
Sizes (BF16, --vocab smollm): Qwen1.5-MoE 1.14 GB per layer + 0.40 GB embeddings/head (6 layers:
7.2 GB); Qwen3-30B-A3B 1.25 GB per layer; Mixtral-8x7B 2.9 GB per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import zipmoe_rt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthetic_pools import (POOL_SIZE, SOURCE_FAN_IN, RealPools, pool_kernels, tensor_seed,  # noqa: E402,F401
                             bf16_to_f32, exponent_entropy, one_blas_thread)
from synthetic_router import fit_router, routing_stats, simulate  # noqa: E402,F401
from synthetic_calibrate import (HELDOUT_BOOKS, LayerSource, Sampler, calibrate,  # noqa: E402,F401
                                 calibration_ids, lm_head, router_inputs, run_layer)
from zipmoe_rt.convert.atomic import replace_dir  # noqa: E402
from zipmoe_rt.convert.safetensors_io import write_safetensors  # noqa: E402
from zipmoe_rt.convert.smollm2 import float32_to_bf16_bits  # noqa: E402,F401
from zipmoe_rt.families import HParams, get_family  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "gutenberg"
SMOLLM_VOCAB = 49152

#: --arch -> (family, hyper-parameters of the released model over the family's defaults,
#: default --skew, (bos, eos, pad, generation eos) token ids of its own vocabulary).
PRESETS = {
    "qwen1.5-moe": ("qwen2_moe", dict(  # Qwen/Qwen1.5-MoE-A2.7B
        max_position_embeddings=8192, rope={"rope_type": "default", "rope_theta": 1e6}),
        0.08, (151643, 151643, None, [151645, 151643])),
    "qwen3-moe": ("qwen3_moe", dict(  # Qwen/Qwen3-30B-A3B
        num_hidden_layers=48, head_dim=128, max_position_embeddings=40960, norm_topk_prob=True,
        rope={"rope_type": "default", "rope_theta": 1e6}),
        0.04, (151643, 151645, None, [151645, 151643])),
    "mixtral": ("mixtral", dict(  # mistralai/Mixtral-8x7B-v0.1
        max_position_embeddings=32768), 0.2, (1, 2, None, 2)),
}
#: --tiny overrides (a model small enough for unit tests).
TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=None,
            num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
            shared_expert_intermediate_size=128, intermediate_size=128, num_hidden_layers=2)
#: config.json keys transformers writes besides the family's (old spellings kept for readers).
CONFIG_EXTRA = {"initializer_range": 0.02, "use_cache": True, "attention_dropout": 0.0,
                "output_router_logits": False, "router_aux_loss_coef": 0.001,
                "torch_dtype": "bfloat16", "dtype": "bfloat16"}


def default_skew(arch: str, experts: int, top_k: int) -> float:
    """The ``--skew`` used when neither ``--skew`` nor ``--zipf`` is given: the preset's
    (measured or guessed for its released shape) if it lies in the valid range ``(1/experts,
    1/top_k]``, else (a shape the preset's value does not fit, e.g. ``--tiny`` or ``--experts``)
    the middle of that range. Raises KeyError for an unknown preset."""
    s = PRESETS[arch][2]
    lo, hi = 1.0 / experts, 1.0 / top_k
    return s if lo < s <= hi else round((lo + hi) / 2, 4)


def preset(arch: str, tiny: bool = False, **overrides) -> HParams:
    """The hyper-parameters of preset ``arch`` (its family's typed hparams), with the ``--tiny``
    shape and ``overrides`` (None values ignored; fields the family fixes are left alone, and
    ``head_dim`` follows a changed width or head count).

    Raises:
        KeyError: unknown preset.  ValueError: inconsistent values (from ``validate``).
    """
    family, kw, _, _ = PRESETS[arch]
    fam = get_family(family)
    cls = fam.hparams_class
    over = {**(TINY if tiny else {}), **{k: v for k, v in overrides.items() if v is not None}}
    over = {k: v for k, v in over.items() if k not in cls.FIXED}
    if {"hidden_size", "num_attention_heads"} & set(over):
        over.setdefault("head_dim", None)
    hp = cls(architecture=fam.hf_names[0], family=family, **{**kw, **over})
    hp.validate()
    return hp


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def write_tokenizer(reader, folder: Path, max_len: int) -> dict:
    """SmolLM2 tokenizer.json + tokenizer_config.json (ChatML template); returns special ids."""
    from gguf import Keys as GGUFKeys

    from zipmoe_rt.convert.smollm2 import write_tokenizer_files

    write_tokenizer_files(reader, folder, max_len)

    def tid(key):
        f = reader.fields.get(key)
        return None if f is None else int(f.contents())

    T = GGUFKeys.Tokenizer
    return {"bos": tid(T.BOS_ID), "eos": tid(T.EOS_ID), "pad": tid(T.PAD_ID)}


def _shards(plan, shard_bytes):
    shards, cur, size = [], [], 0
    for name, shape, fn in plan:
        n = 2 * int(np.prod(shape))
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, fn))
        size += n
    if cur:
        shards.append(cur)
    return shards


def build(out_dir, hp: HParams, *, gguf_path=None, vocab_mode="smollm", skew=None, locality=0.30,
          zipf=None, sigma=2.0, jitter=0.05, seed=0, calib_seqs=16, calib_len=128, pcs=32,
          corpus=DEFAULT_CORPUS, calib_files=None, shard_bytes=2_000_000_000, overwrite=False,
          pools: RealPools | None = None, arch=None, log=print) -> dict:
    """Write the synthetic checkpoint of ``hp`` (e.g. from :func:`preset`) into ``out_dir``;
    returns a summary dict (also saved, with per-layer router statistics, as
    ``synthetic.json``).

    ``pools`` reuses already loaded :class:`RealPools` (they must come from ``gguf_path``);
    ``arch`` names the preset for its default skew and special token ids (default: the first
    preset of ``hp``'s family). numpy's BLAS runs on one thread meanwhile.

    Raises:
        FileExistsError: ``out_dir`` exists and not ``overwrite``.
        ValueError: inconsistent shape or knob values.
    """
    with one_blas_thread():
        return _build(out_dir, hp, gguf_path=gguf_path, vocab_mode=vocab_mode, skew=skew,
                      locality=locality, zipf=zipf, sigma=sigma, jitter=jitter, seed=seed,
                      calib_seqs=calib_seqs, calib_len=calib_len, pcs=pcs, corpus=corpus,
                      calib_files=calib_files, shard_bytes=shard_bytes, overwrite=overwrite,
                      pools=pools, arch=arch, log=log)


def _build(out_dir, hp, *, gguf_path, vocab_mode, skew, locality, zipf, sigma, jitter, seed,
           calib_seqs, calib_len, pcs, corpus, calib_files, shard_bytes, overwrite, pools, arch,
           log):
    from zipmoe_rt.convert.smollm2 import build_tokenizer, locate_smollm2_gguf
    from zipmoe_rt.default_model import cache_dir

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fam = get_family(hp.family)
    arch = arch or next(a for a, p in PRESETS.items() if p[0] == hp.family)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    hp.validate()
    E, k = hp.num_experts, hp.num_experts_per_tok
    if skew is None and zipf is None:
        skew = default_skew(arch, E, k)
    if skew is not None and not 1.0 / E < skew <= 1.0 / k:
        raise ValueError(f"--skew must lie in (1/experts, 1/top_k] = ({1 / E:.4f}, {1 / k:.4f}]")
    if locality is not None and not 0.0 <= locality < 1.0:
        raise ValueError("--locality must lie in [0, 1)")
    if pools is None:
        gguf_path = (Path(gguf_path) if gguf_path
                     else locate_smollm2_gguf(cache_dir(), progress=True))
        pools = RealPools(gguf_path, seed)
    gguf_path = pools.path
    log(f"real value pools from {gguf_path.name}: {len(pools.pools)} kinds, "
        f"{sum(p.size for p in pools.pools.values()) / 1e6:.1f} M values "
        f"({time.perf_counter() - t0:.1f} s)")
    ids, calib_desc = calibration_ids(build_tokenizer(pools.reader), calib_seqs, calib_len,
                                      hp.vocab_size, seed, corpus, calib_files)
    sampler = Sampler(hp, pools, seed, jitter)
    cal = calibrate(fam, hp, sampler, ids, dict(skew=skew, locality=locality, zipf=zipf,
                                                sigma=sigma, pcs=pcs), log)

    def producer(s):
        if s.key == "router":
            return lambda: cal["routers"][s.layer]
        if s.key == "lm_head":
            return lambda: lm_head(sampler, s, cal["u_final"])
        return lambda: sampler(s)

    plan = [(s.name, s.shape, producer(s)) for s in fam.tensor_specs(hp) if not s.tied]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        shards = _shards(plan, shard_bytes)
        n = len(shards)
        weight_map, total = {}, 0
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(tmp / fname, {name: ("BF16", shape, fn) for name, shape, fn in sh},
                              metadata={"format": "pt"})
            for name, shape, _ in sh:
                weight_map[name] = fname
                total += 2 * int(np.prod(shape))
            log(f"wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB, "
                f"{time.perf_counter() - t0:.0f} s)")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

        bos, eos, pad, gen_eos = PRESETS[arch][3]
        if vocab_mode == "smollm":
            special = write_tokenizer(pools.reader, tmp, hp.max_position_embeddings)
            bos, eos, pad, gen_eos = special["bos"], special["eos"], special["pad"], None
        if bos is not None and bos >= hp.vocab_size or eos >= hp.vocab_size:
            bos, eos, pad, gen_eos = None, hp.vocab_size - 1, None, None
        cfg = {**fam.hf_config(hp), **CONFIG_EXTRA, "bos_token_id": bos, "eos_token_id": eos,
               "pad_token_id": pad}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": gen_eos or eos, "do_sample": False}
        if pad is not None:
            gen["pad_token_id"] = pad
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        stats = [s for s in cal["stats"] if "alpha" in s]
        if cal["clamped"]:
            got = [s["repeat_eval_half"] for s in stats if s["layer"] in cal["clamped"]]
            log(f"note: --locality {locality} is out of reach in {len(cal['clamped'])} of "
                f"{len(stats)} MoE layers ({', '.join(map(str, cal['clamped']))}); they got the "
                f"nearest reachable value, {min(got):.3f}..{max(got):.3f} (see "
                f"repeat_range_at_tilt_limits in synthetic.json)")
        summary = {
            "generator": "tools/make_synthetic_checkpoint.py",
            "arch": arch,
            "spec": hp.to_hparams(),
            "vocab_mode": vocab_mode,
            "total_bytes": total,
            "shards": n,
            "seed": seed,
            "knobs": {"skew": skew, "locality": locality, "zipf": zipf, "router_scale": sigma,
                      "jitter": jitter, "pcs": pcs},
            "source": {"file": gguf_path.name, "pool_size": POOL_SIZE},
            "calibration": {"seqs": calib_seqs, "len": calib_len, "text": calib_desc},
            "exponent_entropy": {
                "synthetic": {k: round(v, 4) for k, v in sampler.entropy.items()},
                "real_smollm2": {k: round(v, 4) for k, v in pools.real_entropy.items()}},
            "mean_top1_share": round(float(np.mean([s["top1_share"] for s in stats])), 4),
            "mean_repeat": round(float(np.mean([s["repeat_eval_half"] for s in stats])), 4),
            "uniform_repeat": k / E,
            "locality_out_of_reach_layers": cal["clamped"],
            "layers": cal["stats"],
        }
        (tmp / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - t0
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="checkpoint folder to create")
    ap.add_argument("--arch", choices=sorted(PRESETS), default="qwen1.5-moe",
                    help="shape: Qwen1.5-MoE-A2.7B (the default), Qwen3-30B-A3B or Mixtral-8x7B")
    ap.add_argument("--layers", type=int, default=None, dest="num_hidden_layers",
                    help="decoder layers (default: the full depth)")
    ap.add_argument("--vocab", default="smollm",
                    help="'smollm' (49152, with SmolLM2 tokenizer files; the default), 'full' "
                         "(the preset's), or a number")
    ap.add_argument("--tiny", action="store_true",
                    help=f"tiny test shape: {', '.join(f'{k}={v}' for k, v in TINY.items())}")
    for flag, field in (("--hidden", "hidden_size"), ("--experts", "num_experts"),
                        ("--top-k", "num_experts_per_tok"),
                        ("--moe-intermediate", "moe_intermediate_size"),
                        ("--shared-intermediate", "shared_expert_intermediate_size"),
                        ("--heads", "num_attention_heads"), ("--kv-heads", "num_key_value_heads")):
        ap.add_argument(flag, type=int, default=None, dest=field, help=f"override {field}")
    ap.add_argument("--skew", type=float, default=None,
                    help="target share of all top-k selections taken by each layer's most "
                         "popular expert (default per preset: 0.08 for qwen1.5-moe, or the "
                         "middle of (1/experts, 1/top_k] where the preset's value is outside "
                         "it, e.g. with --tiny; uniform = 1/experts)")
    ap.add_argument("--zipf", type=float, default=None,
                    help="fixed Zipf exponent alpha of the expert biases (in units of "
                         "--router-scale) instead of fitting --skew")
    ap.add_argument("--locality", type=float, default=0.30,
                    help="target P(expert selected at token t+1 | selected at t); uniform routing "
                         "gives top_k/experts; reachable range per layer is saved (about "
                         "0.3..0.6 in deeper Qwen1.5-MoE layers); a negative value skips the fit "
                         "(equal weights on the top principal components); default 0.30")
    ap.add_argument("--router-scale", type=float, default=2.0,
                    help="std of the token-dependent router logits (default 2.0)")
    ap.add_argument("--jitter", type=float, default=0.05,
                    help="std of the per-tensor log-scale jitter of the resampled weights "
                         "(default 0.05)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of every draw (weights, expert ranking, router, calibration "
                         "passages; default 0)")
    ap.add_argument("--calib-seqs", type=int, default=16,
                    help="calibration sequences (default 16; the even ones give the principal "
                         "components, the odd ones the locality fit)")
    ap.add_argument("--calib-len", type=int, default=128,
                    help="tokens per calibration sequence (default 128)")
    ap.add_argument("--calib-text", type=Path, nargs="*", default=None,
                    help=f"text files for calibration (default: {DEFAULT_CORPUS}/*.txt minus "
                         f"{', '.join(HELDOUT_BOOKS)})")
    ap.add_argument("--shard-size", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="SmolLM2 GGUF (default: located/downloaded)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-layer progress lines")
    a = ap.parse_args(argv)

    fixed = get_family(PRESETS[a.arch][0]).hparams_class.FIXED
    if a.shared_expert_intermediate_size and "shared_expert_intermediate_size" in fixed:
        ap.error(f"{a.arch} has no shared expert")
    over = {f: getattr(a, f) for f in ("num_hidden_layers", "hidden_size", "num_experts",
                                       "num_experts_per_tok", "moe_intermediate_size",
                                       "shared_expert_intermediate_size", "num_attention_heads",
                                       "num_key_value_heads")}
    if a.vocab == "smollm":
        over["vocab_size"] = SMOLLM_VOCAB
    elif a.vocab != "full":
        try:
            over["vocab_size"] = int(a.vocab)
        except ValueError:
            ap.error("--vocab must be 'smollm', 'full' or an integer")
    log = (lambda *x, **k: None) if a.quiet else (lambda *x, **k: print(*x, **k, flush=True))
    try:
        summ = build(a.out_dir, preset(a.arch, a.tiny, **over), gguf_path=a.gguf,
                     vocab_mode="smollm" if a.vocab == "smollm" else "other", arch=a.arch,
                     skew=a.skew, zipf=a.zipf, locality=None if a.locality < 0 else a.locality,
                     sigma=a.router_scale, jitter=a.jitter, seed=a.seed, calib_seqs=a.calib_seqs,
                     calib_len=a.calib_len, calib_files=a.calib_text,
                     shard_bytes=int(a.shard_size * 1e9), overwrite=a.overwrite, log=log)
    except (FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ent = summ["exponent_entropy"]
    print("exponent entropy (bits): synthetic " + ", ".join(
        f"{k} {v:.3f}" for k, v in ent["synthetic"].items()))
    print("                         real SmolLM2 " + ", ".join(
        f"{k} {v:.3f}" for k, v in ent["real_smollm2"].items()))
    print(f"router: mean top-1 share {summ['mean_top1_share']:.3f} (target "
          f"{summ['knobs']['skew']}), mean repeat probability {summ['mean_repeat']:.3f} "
          f"(target {summ['knobs']['locality']}, uniform {summ['uniform_repeat']:.3f}) "
          f"on the calibration text (repeat: odd sequences, whose contexts the PCs never saw)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {a.out_dir}: {summ['total_bytes'] / 1e9:.2f} GB BF16 "
          f"({summ['total_bytes'] / 2**30:.2f} GiB) in {summ['shards']} shards, "
          f"{summ['seconds']:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

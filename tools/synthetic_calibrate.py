"""Calibration of tools/make_synthetic_checkpoint.py: the calibration text (token ids from the
corpus books), the sampler that draws every tensor from the real-value pools, the synthetic
lm_head, and the layer-by-layer pass that fits each router to the hidden states it will see
(see the tool's docstring for the model).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import time
from pathlib import Path

import numpy as np

from synthetic_pools import (SOURCE_FAN_IN, RealPools, bf16_to_f32, exponent_entropy,
                             tensor_seed)
from synthetic_router import fit_router, routing_stats
from zipmoe_rt.convert.smollm2 import float32_to_bf16_bits
from zipmoe_rt.families import HParams

#: books kept out of the default calibration text (used for held-out verification).
HELDOUT_BOOKS = ("melville-moby_dick.txt", "shakespeare-hamlet.txt")
#: attention tensors are drawn under these short names (kept so checkpoints stay the same).
_ATTN_TAGS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "o", "attn_q_bias": "q_b",
              "attn_k_bias": "k_b", "attn_v_bias": "v_b", "attn_o_bias": "o_b"}
#: logical tensor key -> pool kind (router and lm_head are made separately).
_POOL = {"embed": "embed", "attn_norm": "attn_norm", "attn_q_norm": "attn_norm",
         "attn_k_norm": "attn_norm", "ffn_norm": "ffn_norm", "norm": "out_norm",
         "attn_q": "q", "attn_q_bias": "q", "attn_k": "k", "attn_k_bias": "k", "attn_v": "v",
         "attn_v_bias": "v", "attn_o": "o", "attn_o_bias": "o",
         "expert_gate": "gate", "expert_up": "up", "expert_down": "down", "shared_gate": "gate",
         "shared_up": "up", "shared_down": "down", "shared_expert_gate": "gate",
         "mlp_gate": "gate", "mlp_up": "up", "mlp_down": "down"}


def calibration_ids(tokenizer, seqs: int, length: int, vocab: int, seed: int,
                    corpus: Path | None, files=None) -> tuple[np.ndarray, str]:
    """[seqs, length] token ids (mod ``vocab``) from the corpus books (round-robin, random
    offsets), skipping :data:`HELDOUT_BOOKS` unless ``files`` names them; random Zipf ids if no
    text is available. Returns (ids, description)."""
    rng = np.random.default_rng([seed, 7])
    if files is None and corpus is not None and corpus.is_dir():
        files = sorted(p for p in corpus.glob("*.txt") if p.name not in HELDOUT_BOOKS)
    if files and tokenizer is not None:
        out = []
        for i in range(seqs):
            f = Path(files[i % len(files)])
            text = f.read_text(errors="replace")
            need = length * 8
            start = int(rng.integers(0, max(1, len(text) - need)))
            # [1:]: drop the first token, a partial word
            ids = tokenizer.encode(text[start:start + need]).ids[1:length + 1]
            if len(ids) < length:
                ids = (ids * (length // max(1, len(ids)) + 1))[:length]
            out.append(ids)
        return np.asarray(out, np.int64) % vocab, f"{len(files)} books: " + ", ".join(
            Path(f).name for f in files)
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks
    return rng.choice(vocab, size=(seqs, length), p=p / p.sum()), "random Zipf(1) token ids"


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------

class Sampler:
    """Draws every tensor of the checkpoint but the routers and lm_head, deterministically from
    (seed, tensor), so the calibration pass and the writer get the same bits.

    Args:
        hp: the model's hyper-parameters.  pools: :class:`RealPools`.  seed, jitter: knobs.
    """

    def __init__(self, hp: HParams, pools: RealPools, seed: int, jitter: float):
        self.hp, self.pools, self.seed, self.jitter = hp, pools, seed, jitter
        self.entropy: dict[str, float] = {}

    def fan_in(self, key: str) -> int | None:
        """Input width of a projection (None for norms and the embedding)."""
        hp = self.hp
        if _POOL[key] not in SOURCE_FAN_IN:
            return None
        if key.startswith("attn_o"):
            return hp.num_attention_heads * hp.head_dim
        return {"expert_down": hp.moe_intermediate_size,
                "shared_down": hp.shared_expert_intermediate_size,
                "mlp_down": hp.intermediate_size}.get(key, hp.hidden_size)

    def draw(self, name, kind, shape, fan_in=None, scale=1.0, offset=None) -> np.ndarray:
        """BF16 bits of pool ``kind`` draws keyed by ``name``, fan-in scaled and jittered."""
        key = tensor_seed(self.seed, name)
        if fan_in is not None:
            scale *= math.sqrt(SOURCE_FAN_IN[kind] / fan_in)
        scale *= math.exp(self.jitter * np.random.default_rng(key).standard_normal())
        return self.pools.sample(kind, shape, key, scale, offset)

    def __call__(self, spec) -> np.ndarray:
        """BF16 bits (uint16) of tensor ``spec`` (a registry TensorSpec)."""
        if spec.key == "embed":
            mean = self.pools.pools["embed_mean"]
            rng = np.random.default_rng(tensor_seed(self.seed, "embed_offset"))
            bits = self.draw(spec.name, "embed", spec.shape,
                             offset=mean[rng.integers(0, mean.size, spec.shape[1])])
            self.entropy["embed_tokens"] = exponent_entropy(bits)
            return bits
        name = spec.name
        if spec.key in _ATTN_TAGS:
            name = f"model.layers.{spec.layer}.self_attn.{_ATTN_TAGS[spec.key]}"
        bits = self.draw(name, _POOL[spec.key], spec.shape, self.fan_in(spec.key))
        if spec.layer == 0 and spec.expert in (0, 1):
            self.entropy[f"layer0.expert{spec.expert}.{spec.role}"] = exponent_entropy(bits)
        return bits


def lm_head(sampler: Sampler, spec, u: np.ndarray) -> np.ndarray:
    """Rows drawn like the embedding's, minus their component along the final hidden states'
    common direction ``u``: otherwise that direction alone picks the argmax, the same few
    tokens for every position, and generation collapses to one repeated token."""
    bits = sampler.draw(spec.name, "embed", spec.shape, scale=math.sqrt(576 / spec.shape[1]))
    for lo in range(0, spec.shape[0], 8192):
        w = bf16_to_f32(bits[lo:lo + 8192])
        w -= np.outer(w @ u, u)
        bits[lo:lo + 8192] = float32_to_bf16_bits(w)
    return bits


# --------------------------------------------------------------------------------------------
# calibration: the runtime's model, one layer at a time
# --------------------------------------------------------------------------------------------

class LayerSource:
    """A WeightSource (``zipmoe_rt.models.weights``) holding decoder layer ``layer`` of the model
    being written as layer 0 of a one-layer model (tied 1-row embedding, unit final norm: the
    calibration drives the layer itself). Experts are drawn on first use and kept."""

    def __init__(self, fam, hp: HParams, layer: int, specs, sampler: Sampler, router=None):
        moe = layer in hp.moe_layers
        one = dataclasses.replace(hp, num_hidden_layers=1, vocab_size=1, tie_word_embeddings=True,
                                  moe_layers=[0] if moe else [], sliding_window=hp.window(layer),
                                  layer_types=None)
        if hasattr(one, "max_window_layers"):
            one.max_window_layers = None
        self.hparams = one.to_hparams()
        H = hp.hidden_size
        self.dense = {fam.tensor_name("embed"): np.zeros((1, H), np.uint16),
                      fam.tensor_name("norm"): np.full(H, 0x3F80, np.uint16)}
        self.experts: dict = {}
        for s in specs:
            if s.is_expert:
                self.experts.setdefault(s.expert, {})[s.role] = s
            elif s.key == "router":
                self.dense[fam.tensor_name("router", 0)] = (
                    router if router is not None else np.zeros(s.shape, np.uint16))
            else:
                self.dense[fam.tensor_name(s.key, 0)] = sampler(s)
        self.sampler, self._drawn = sampler, {}

    def tensor(self, name):
        return self.dense[name]

    def has(self, name):
        return name in self.dense

    def expert(self, layer, e):
        from zipmoe_rt.models.weights import assemble_expert

        if e not in self._drawn:
            self._drawn[e] = assemble_expert({r: self.sampler(s)
                                              for r, s in self.experts[e].items()})
        return self._drawn[e]


class _Captured(Exception):
    """Raised by the route hook once the router input is captured."""


def run_layer(net, x: np.ndarray, hook=None) -> np.ndarray:
    """Decoder layer 0 of the one-layer runtime model ``net`` over one sequence ``x`` (float32
    [S, H], positions 0..S-1, a fresh KV cache), as ``Model.forward`` runs its layers; returns
    the output (a new array). ``hook`` becomes ``net.route_hook``."""
    S = x.shape[0]
    cos, sin = net.rope.cos_sin(0, S)
    cache = net.new_cache(capacity=S)
    cache.reserve(S)
    net.route_hook = hook
    return net.layers[0](np.array(x, np.float32), cache.layers[0], 0, cos, sin)


def router_inputs(net, xs) -> np.ndarray:
    """The router inputs (post-attention RMSNorm outputs) of every sequence, [B*S, H]."""
    got = []

    def grab(layer, h, logits, idx, w):
        got.append(h.copy())
        raise _Captured

    for x in xs:
        try:
            run_layer(net, x, grab)
        except _Captured:
            pass
    return np.concatenate(got)


def calibrate(fam, hp: HParams, sampler: Sampler, ids: np.ndarray, knobs: dict, log) -> dict:
    """Design every router on the runtime's forward pass over the calibration ids, layer by
    layer. Returns {"routers": {layer: BF16 bits}, "u_final": unit float32 [H], "stats": [...],
    "clamped": [layers where --locality was out of reach]}.

    Raises:
        FloatingPointError: the hidden states stop being finite.
    """
    from zipmoe_rt.models import build_model

    specs = fam.tensor_specs(hp)
    embed = next(s for s in specs if s.key == "embed")
    xs = list(bf16_to_f32(sampler(embed)[ids]))            # B x [S, H]
    B, E, k = ids.shape[0], hp.num_experts, hp.num_experts_per_tok
    routers, stats, clamped = {}, [], []
    t0 = time.perf_counter()
    for layer in range(hp.num_hidden_layers):
        mine = [s for s in specs if s.layer == layer]
        src = LayerSource(fam, hp, layer, mine, sampler)
        st = {"layer": layer}
        if layer in hp.moe_layers:
            X = router_inputs(build_model(src), xs)
            fit = fit_router(X, B, E, k, knobs["skew"], knobs["locality"], knobs["sigma"],
                             np.random.default_rng([sampler.seed, 1000 + layer]),
                             zipf=knobs["zipf"], pcs=knobs["pcs"])
            routers[layer] = float32_to_bf16_bits(fit.weight)
            src.dense[fam.tensor_name("router", 0)] = routers[layer]
            seen = []
            net = build_model(src)
            xs = [run_layer(net, x, lambda l, h, lg, i, w: seen.append((lg.copy(), w.copy())))
                  for x in xs]
            logits = np.concatenate([lg for lg, _ in seen])
            s_all = routing_stats(logits, k, B)
            odd = np.arange(1, B, 2) if B >= 2 else np.arange(1)
            s_ev = routing_stats(np.concatenate([seen[i][0] for i in odd]), k, len(odd))
            st.update({
                "alpha": round(fit.alpha, 4), "tau": round(fit.tau, 4),
                "top1_share": round(s_all["top1_share"], 4), "repeat": round(s_all["repeat"], 4),
                "repeat_eval_half": round(s_ev["repeat"], 4),
                "share_by_rank": [round(float(x), 4) for x in s_all["share_by_rank"][:8]],
                "topk_prob_mass": round(float(np.concatenate([w for _, w in seen]).sum(1).mean()), 4),
                "common_mode_cos": round(fit.common_cos, 4),
                "slow_rho_range": [round(x, 3) for x in fit.rho_range],
                "repeat_range_at_tilt_limits": [round(x, 3) for x in fit.achievable],
                "expert_rank": fit.rank.tolist(),
                "calibration_counts": s_all["counts"].tolist()})
            loc = knobs["locality"]
            if loc is not None and not min(fit.achievable) - 0.01 <= loc <= max(fit.achievable) + 0.01:
                clamped.append(layer)
        else:
            xs = [run_layer(build_model(src), x) for x in xs]
        src = net = None                 # free this layer's experts before the next layer's
        gc.collect()                     # (the runtime model and its blocks form cycles)
        x_all = np.stack(xs)
        st["residual_rms"] = round(float(np.sqrt((x_all ** 2).mean())), 3)
        stats.append(st)
        log(f"layer {layer:2d}: " + (
            f"top-1 share {st['top1_share']:.3f} (alpha {st['alpha']:.2f}), repeat "
            f"{st['repeat']:.3f} / {st['repeat_eval_half']:.3f} on the odd sequences (tilt "
            f"{st['tau']:+.2f}), top-k mass {st['topk_prob_mass']:.2f}, "
            if "alpha" in st else "dense MLP, ") +
            f"|x| rms {st['residual_rms']:.2f}, {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        if not np.isfinite(x_all).all():
            raise FloatingPointError(f"calibration forward pass is not finite after layer {layer}")
    norm = bf16_to_f32(sampler(next(s for s in specs if s.key == "norm")))
    x = np.concatenate(xs)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(hp.rms_norm_eps)) * norm
    m = h.mean(0, dtype=np.float64)
    return {"routers": routers, "u_final": (m / np.linalg.norm(m)).astype(np.float32),
            "stats": stats, "clamped": clamped}

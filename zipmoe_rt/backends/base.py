"""The compute-backend contract: every array allocation and compute op the model and the expert
executors need, one method each, so that another backend (NumPy reference, CuPy later) slots in
without touching model code.

Conventions, for every backend:

* Activations are float32 arrays of the backend (numpy arrays for the CPU backends, device arrays
  for a GPU backend), shaped ``[T, n]`` for ``T`` tokens of one sequence, C-contiguous.
* Weights are ``[out, in]`` like ``torch.nn.Linear.weight``: BF16 as ``uint16`` bit patterns (the
  fast path), float16 or float32. Dense weights pass through :meth:`Backend.from_host` once, when
  the model is built; expert weights are host :class:`~zipmoe_rt.models.weights.ExpertWeights`
  handed over on every use (a device backend uploads or caches them itself).
* Small index arrays (token ids, routed rows) and routing decisions are host numpy arrays: the
  executor decides on the host which experts to fetch.
* Methods ending in ``_`` update their first argument in place.

The math of each op names the transformers source it follows; ``numba_cpu`` is the reference for
bit-exact outputs, ``numpy_ref`` for readability.
"""
from __future__ import annotations

import numpy as np

from .checks import (ACTIVATIONS, ROUTE_METHODS, ROUTE_SCORINGS, ClampedSwiGLU,  # noqa: F401
                     check_act, check_biased_expert, check_cap, check_choice_bias,
                     check_gated_delta, check_qk_norm, check_route, check_sinks, to_f32)
from .host_arrays import HostArrays  # noqa: F401  (the backends' mixin, named here)

__all__ = ["Backend", "HostArrays", "check_qk_norm", "check_route", "check_choice_bias",
           "to_f32", "ROUTE_METHODS", "ROUTE_SCORINGS", "ACTIVATIONS", "check_act", "check_cap",
           "check_gated_delta", "ClampedSwiGLU", "check_biased_expert", "check_sinks"]


class Backend:
    """Base class of compute backends; each op documents shapes, dtypes and the source it
    follows. Subclasses implement every method (the defaults raise NotImplementedError).

    Attributes:
        name: the name :func:`zipmoe_rt.backends.get_backend` knows it by.
    """

    name = "abstract"

    # -- arrays --------------------------------------------------------------------------------

    def empty(self, shape, dtype=np.float32):
        """Uninitialised array of ``shape`` (tuple of ints) and ``dtype`` (default float32)."""
        raise NotImplementedError

    def zeros(self, shape, dtype=np.float32):
        """Zero-filled array of ``shape`` and ``dtype`` (default float32)."""
        raise NotImplementedError

    def from_host(self, a: np.ndarray):
        """A host numpy array (a dense weight, a RoPE table) as a C-contiguous backend array of
        the same dtype and shape. May return ``a`` itself on CPU backends."""
        raise NotImplementedError

    def to_host(self, a) -> np.ndarray:
        """A backend array as a host numpy array (may share memory on CPU backends)."""
        raise NotImplementedError

    def upload(self, *arrays) -> list:
        """Small host arrays made on every step (RoPE tables, token ids, routing rows and
        weights) as backend arrays, one per argument (same dtype and shape): :meth:`from_host`
        of each here; the CUDA backend copies them together in one transfer."""
        return [self.from_host(a) for a in arrays]

    # -- dense algebra -------------------------------------------------------------------------

    def embed(self, W, ids: np.ndarray):
        """Embedding rows ``W[ids]`` as float32 (``nn.Embedding`` of the modeling files).

        Args:
            W: [V, H] weight (BF16 bits, float16 or float32).  ids: host int64 [T].
        Returns:
            float32 [T, H].
        Raises:
            IndexError: an id outside [0, V).
        """
        raise NotImplementedError

    def linear(self, x, W, bias=None, out=None):
        """``x @ W.T (+ bias)`` with float32 accumulation (``nn.functional.linear`` on the
        up-cast weight, as every ``nn.Linear`` of the modeling files).

        Args:
            x: float32 [T, in].  W: [out, in] (BF16 bits, float16 or float32).
            bias: optional float32 [out].  out: optional float32 [T, out] to write into.
        Returns:
            float32 [T, out] (``out`` when given).
        Raises:
            TypeError: unsupported weight dtype.
        """
        raise NotImplementedError

    def heads_linear(self, x, W, out=None):
        """One product per head, ``out[h] = x[h] @ W[h].T`` with float32 accumulation (the
        absorbed ``kv_b_proj`` of Multi-head Latent Attention, :mod:`zipmoe_rt.models.mla`).

        Args:
            x: float32 [nh, T, in].  W: [nh, out, in] (BF16 bits, float16 or float32).
            out: optional float32 [nh, T, out] to write into.
        Returns:
            float32 [nh, T, out] (``out`` when given).
        Raises:
            TypeError: unsupported weight dtype.  ValueError: shapes disagree.
        """
        raise NotImplementedError

    def swiglu(self, x, gate, up, act: str = "silu"):
        """The hidden activation of a SwiGLU MLP, ``silu(x @ gate.T) * (x @ up.T)``
        (``act_fn(gate_proj(x)) * up_proj(x)`` in ``Qwen2MoeMLP`` / ``MixtralExperts``), or with
        another ``act`` of :data:`ACTIVATIONS` in place of SiLU (Gemma 4's GELU-tanh:
        ``Gemma4TextMLP``, ``Gemma4TextExperts``).

        Args:
            x: float32 [T, H].  gate, up: [I, H] weights.  act: a name of :data:`ACTIVATIONS`.
        Returns:
            float32 [T, I].
        Raises:
            ValueError: an unknown ``act``.
        """
        raise NotImplementedError

    def expert_accumulate(self, out, x, rows: np.ndarray, weights: np.ndarray, expert,
                          act: str = "silu", glu: "ClampedSwiGLU | None" = None) -> None:
        """``out[rows[i]] += weights[i] * expert(x[rows[i]])`` for one SwiGLU expert, its
        ``down @ (silu(gate @ x) * (up @ x))`` (loop body of ``MixtralExperts.forward``: the
        ``index_add_`` of the weighted expert output); ``act`` replaces SiLU as in
        :meth:`swiglu`.

        With ``glu`` (gpt-oss, loop body of ``GptOssExperts.forward``) the expert has biases
        and a clamped SwiGLU: ``g = x gate^T + gate_bias``, ``u = x up^T + up_bias``,
        ``y = glu(g, u) down^T + down_bias`` (:class:`ClampedSwiGLU`), ``y * weight`` added.

        Args:
            out: float32 [T, H], updated in place.  x: float32 [T, H].
            rows: host int64 [n], distinct token indices.  weights: host float32 [n].
            expert: :class:`~zipmoe_rt.models.weights.ExpertWeights` (gate, up [I, H],
                down [H, I]; host arrays) or a :class:`~zipmoe_rt.models.packed.PackedExpert`
                (the compute form of ``--resident compressed``; the result must be the one
                of its decoded weights, :func:`~zipmoe_rt.models.packed.as_weights`).
            act: the gate activation (a name of :data:`ACTIVATIONS`; ignored with ``glu``).
            glu: None (gated with ``act``), or the constants of gpt-oss's clamped SwiGLU; the expert then
                has float32 ``gate_bias``, ``up_bias`` [I] and ``down_bias`` [H]
                (:func:`check_biased_expert`).
        Raises:
            ValueError: shapes disagree; with ``glu``, an expert without biases.
        """
        raise NotImplementedError

    def experts_token(self, out, x, experts, weights: np.ndarray, act: str = "silu",
                      glu: "ClampedSwiGLU | None" = None) -> None:
        """``out += sum_e weights[e] * expert_e(x)`` for ONE token and its k experts (the decode
        step of ``MixtralExperts.forward``; the Numba backend fuses all k into two parallel
        regions); ``act`` replaces SiLU as in :meth:`swiglu`.

        Args:
            out: float32 [H], updated in place.  x: float32 [H].
            experts: sequence of k :class:`~zipmoe_rt.models.weights.ExpertWeights` (or
                :class:`~zipmoe_rt.models.packed.PackedExpert`) of one shape.
            weights: host float32 [k] routing weights, in the order of ``experts``.
            act: as in :meth:`expert_accumulate`.
            glu: None, or gpt-oss's clamped SwiGLU (:meth:`expert_accumulate`): each expert's
                output added in order.
        Raises:
            ValueError: shapes disagree; with ``glu``, an expert without biases.
        """
        raise NotImplementedError

    # -- normalisation, elementwise ------------------------------------------------------------

    def rmsnorm(self, x, w, eps, out=None):
        """RMSNorm as ``MixtralRMSNorm``: ``w * (x / sqrt(mean(x**2) + eps))`` per row, float32.

        Args:
            x: float32 [T, n].  w: float32 [n].  eps: float (used as float32).
            out: optional float32 [T, n] (not aliasing ``x``).
        Returns:
            float32 [T, n] (``out`` when given).
        """
        raise NotImplementedError

    def add_(self, a, b):
        """``a += b`` (the residual connection); float32 [T, n]. Returns ``a``."""
        raise NotImplementedError

    def sigmoid_gate_add_(self, y, g, s):
        """``y += sigmoid(g) * s`` (``Qwen2MoeSparseMoeBlock``'s shared expert:
        ``F.sigmoid(shared_expert_gate(x)) * shared_expert(x)``).

        Args:
            y: float32 [T, H], updated in place.  g: float32 [T, 1].  s: float32 [T, H].
        Returns:
            ``y``.
        """
        raise NotImplementedError

    # -- attention -----------------------------------------------------------------------------

    def rope_qk_cache(self, qkv, nq: int, nkv: int, hd: int, q_norm, k_norm, eps, cos, sin,
                      kc, vc, pos0: int, clip: float | None = None) -> None:
        """In place on ``qkv`` (q heads, then k heads, then v heads of each token), in this
        order: optional RMSNorm of q and of k, optional clamping of q, k and v, RoPE
        (``apply_rotary_pos_emb`` with ``rotate_half``); then token ``t``'s k and v are written
        to ``kc[:, pos0 + t]`` and ``vc[:, pos0 + t]``.

        The size of a norm weight says what it normalises:

        * ``hd``: each head on its own (``Qwen3MoeAttention``'s ``q_norm`` / ``k_norm`` over
          head_dim, applied after the split into heads);
        * ``nq * hd`` for q, ``nkv * hd`` for k: the whole projection of the token
          (``OlmoeAttention``: ``q_norm(q_proj(x))``, before the split into heads).

        With one head both readings are the same computation.

        Args:
            qkv: float32 [T, (nq + 2 nkv) * hd].  nq, nkv, hd: heads and head size.
            q_norm: float32 [hd] or [nq * hd], or float32 [0] for none.
            k_norm: float32 [hd] or [nkv * hd], or float32 [0] for none.  eps: np.float32.
            cos, sin: float32 [T, rot / 2] (:meth:`~zipmoe_rt.models.rope.RoPE.cos_sin`, through
                :meth:`from_host`): RoPE turns the first ``rot`` dimensions of each head
                (``rot = hd``, or less with a partial rotary factor, as GLM-4-MoE's
                ``apply_rotary_pos_emb``: pairs ``i`` and ``i + rot/2``; the rest pass).
            kc, vc: float32 [nkv, capacity, hd], ``capacity >= pos0 + T``
                (:class:`~zipmoe_rt.models.cache.KVCache` buffers).  pos0: first position.
            clip: None, or clamp q, k and v to ``[-clip, clip]`` after the norms and before
                RoPE (``OlmoeAttention``'s ``clip_qkv``: ``clamp_(min=-clip, max=clip)``).
        Raises:
            ValueError: a norm weight of another size, a negative ``clip`` or tables wider than
                the head (:func:`check_qk_norm`).
        """
        raise NotImplementedError

    def attention(self, qkv, nq: int, nkv: int, hd: int, kc, vc, pos0: int, window: int,
                  scale, out):
        """Causal grouped-query softmax attention (``eager_attention_forward``): query head
        ``h`` of token ``t`` (position ``p = pos0 + t``) attends to keys ``j <= p`` (and
        ``j > p - window`` when ``window > 0``, sliding window) of kv head ``h // (nq // nkv)``
        with scores ``q . k * scale``.

        Args:
            qkv: float32 [T, (nq + 2 nkv) * hd] after :meth:`rope_qk_cache` (only the first
                ``nq * hd`` columns, q, are read: Multi-head Latent Attention passes q alone,
                [T, nq * hd], :mod:`zipmoe_rt.models.mla`).
            kc, vc: float32 [nkv, capacity, hd], positions ``< pos0 + T`` valid.
            window: tokens, 0 = full attention.  scale: np.float32.
            out: float32 [T, nq * hd], overwritten.
        Returns:
            ``out``.
        """
        raise NotImplementedError

    # -- routing -------------------------------------------------------------------------------

    def route(self, logits, k: int, renorm: bool, scoring: str = "softmax",
              method: str = "greedy", n_group: int = 1, topk_group: int = 1, bias=None,
              scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k routing of router logits, in float32. With the defaults, softmax top-k
        (``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``): softmax over all experts, the k
        largest in descending order (lowest index first on ties), divided by their sum when
        ``renorm`` (``norm_topk_prob``). The other arguments give the routers of the DeepSeek /
        GLM lineage (``DeepseekV2TopkRouter``, ``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter``):

        * ``scoring``: ``"softmax"`` or ``"sigmoid"`` of the logits gives the scores;
        * ``bias``: added to the scores for the choice only (``e_score_correction_bias``);
        * ``method``: ``"greedy"`` (every expert eligible); ``"group_limited_greedy"`` (V2:
          experts in ``n_group`` equal groups, only the ``topk_group`` groups with the largest
          maximum choice score eligible); ``"noaux_tc"`` (V3 / GLM: the same, the group score
          being the sum of the group's two largest choice scores);
        * the weights are the unbiased scores of the chosen experts, divided by their sum when
          ``renorm`` (sigmoid scoring: by ``sum + 1e-20``, as ``DeepseekV3TopkRouter``), then
          multiplied by ``scale`` (``routed_scaling_factor``).

        The experts come in descending choice score, lowest index first on ties (transformers'
        ``topk(sorted=False)`` promises no order; the sparse block sums experts by index).

        Args:
            logits: float32 [T, E] router logits.  k: experts per token.  renorm: bool.
            scoring, method: see above.  n_group, topk_group: ints (``E % n_group == 0``).
            bias: None or float32 [E] (host).  scale: float.
        Returns:
            host (topk_idx int64 [T, k], topk_w float32 [T, k]).
        Raises:
            ValueError: from :func:`check_route`.
        """
        raise NotImplementedError

    # -- PhiMoE: LayerNorm and the sparsemixer router ----------------------------------------

    def layer_norm(self, x, w, b, eps, out=None):
        """LayerNorm as ``torch.nn.LayerNorm(n, eps, elementwise_affine=True)`` (PhiMoE's
        ``input_layernorm``, ``post_attention_layernorm`` and final ``norm``,
        ``modeling_phimoe.py``): ``(x - mean) / sqrt(var + eps) * w + b`` per row, with the
        biased variance, float32.

        Args:
            x: float32 [T, n].  w, b: float32 [n].  eps: float (used as float32).
            out: optional float32 [T, n] (not aliasing ``x``).
        Returns:
            float32 [T, n] (``out`` when given).
        """
        raise NotImplementedError

    def route_sparsemixer(self, logits, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
        """PhiMoE's router at inference (``sparsemixer(scores, jitter_eps, training=False)`` in
        ``modeling_phimoe.py``): the best expert ``i1`` with weight ``softmax(masked)[i1]``,
        where the softmax keeps only experts ``j`` with
        ``(s[i1] - s[j]) / max(|s[j]|, s[i1]) <= 2 * jitter_eps``; then, with ``i1`` removed,
        the best remaining expert ``i2`` with the same rule around ``s[i2]``. No noise (eval);
        the two weights are not renormalised.

        Args:
            logits: float32 [T, E] router logits (E >= 2).  jitter_eps: ``router_jitter_noise``.
        Returns:
            host (topk_idx int64 [T, 2] as ``[i1, i2]``, topk_w float32 [T, 2]).
        Raises:
            ValueError: fewer than 2 experts.
        """
        raise NotImplementedError

    # -- Granite-MoE: scalar multipliers --------------------------------------------------------

    def scale_(self, x, s: float, divide: bool = False):
        """``x *= s`` (or ``x /= s`` with ``divide``), float32: Granite's
        ``embedding_multiplier`` and ``residual_multiplier`` (``inputs_embeds *
        embedding_multiplier``, ``hidden_states * residual_multiplier``) and its
        ``logits / logits_scaling`` (``modeling_granitemoe.py``), rounded as torch does (a
        division is not a multiplication by the reciprocal).

        Args:
            x: float32 [T, n], updated in place.  s: the scalar (cast to float32).
            divide: divide instead of multiply.
        Returns:
            ``x``.
        """
        raise NotImplementedError

    # -- ERNIE 4.5 MoE: routing with a choice bias ----------------------------------------------

    def route_choice_bias(self, logits, k: int, bias, norm_min: float
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k routing whose choice is biased (``Ernie4_5_MoeTopKRouter``): float32 softmax
        over all experts ``p``; the k experts with the largest ``p + bias`` (descending, lowest
        index first on ties); their weights are ``p`` (unbiased) divided by
        ``max(sum of the k p, norm_min)``.

        Args:
            logits: float32 [T, E] router logits.  k: experts per token.
            bias: float32 [E] (``moe_statics.e_score_correction_bias``), used for the choice
                only.  norm_min: the clamp of the sum (``moe_norm_min``).
        Returns:
            host (topk_idx int64 [T, k], topk_w float32 [T, k]).
        Raises:
            ValueError: ``bias`` not of E values.
        """
        raise NotImplementedError

    # -- Gemma 4: logit soft-capping -----------------------------------------------------------

    def softcap_(self, x, cap: float):
        """``x = tanh(x / cap) * cap`` in place, float32 (``Gemma4ForCausalLM.forward``'s
        ``final_logit_softcapping``: ``logits / cap``, ``tanh``, ``* cap``, each rounded).

        Args:
            x: float32 [T, n], updated in place.  cap: the positive cap (cast to float32).
        Returns:
            ``x``.
        Raises:
            ValueError: a cap that is not a positive finite number.
        """
        raise NotImplementedError

    # -- device ------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait until every op queued so far has finished (a no-op on the host backends, whose
        ops run synchronously); for timing."""

    def resident_experts(self, source):
        """``source`` as the model's default executor should read it on this backend: host
        backends use the source's arrays as they are (returned unchanged); a device backend
        returns a wrapper that keeps each expert on the device after its first use.

        Args:
            source: a :class:`~zipmoe_rt.models.weights.WeightSource`.
        """
        return source

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"

    # -- Qwen3-Next / Qwen3.5-MoE: gated attention and Gated DeltaNet ---------------------------

    def sigmoid_mul_(self, x, g):
        """``x *= sigmoid(g)`` (``Qwen3NextAttention``'s output gate:
        ``attn_output * torch.sigmoid(gate)``), float32 [T, n] both. Returns ``x``."""
        raise NotImplementedError

    def conv1d_silu(self, x, w, state, new_state, silu=True, bias=None):
        """Causal depthwise conv1d of kernel ``K`` over each channel, continuing the ``K - 1``
        inputs held in ``state``, then SiLU (``causal_conv1d_fn`` / ``causal_conv1d_update`` of
        transformers' ``models/mamba/modeling_mamba.py`` with ``activation="silu"``, as
        ``Qwen3NextGatedDeltaNet`` calls them): ``y[t, c] = silu(sum_j w[c, j] *
        ext[t + j, c])`` with ``ext = concat(state, x)``. With ``silu=False`` and a ``bias``,
        LFM2's short convolution (``Lfm2MoeShortConv``: ``activation=None``, ``conv_bias``):
        ``y[t, c] = sum_j w[c, j] * ext[t + j, c] + bias[c]``.

        Args:
            x: float32 [T, C].  w: float32 [C, K] (``conv1d.weight`` [C, 1, K] squeezed).
            state: float32 [K - 1, C], the previous inputs, oldest first (zeros at the start).
            new_state: float32 [K - 1, C], written with the last ``K - 1`` rows of ``ext``;
                must not alias ``state``.
            silu: apply the SiLU (default True).  bias: None or float32 [C], added before it.
        Returns:
            float32 [T, C].
        """
        raise NotImplementedError

    def gated_delta_rule(self, qkv, ba, A_log, dt_bias, nk: int, nv: int, dk: int, dv: int,
                         state, new_state):
        """The gated delta rule of ``Qwen3NextGatedDeltaNet`` after its convolution: per value
        head ``h`` (key head ``h // (nv / nk)``), ``beta = sigmoid(b)``,
        ``g = -exp(A_log) * softplus(a + dt_bias)``, q and k L2-normalised (eps 1e-6), q
        scaled by ``dk ** -0.5``; then for each token ``S *= exp(g)``,
        ``S += k (x) ((v - S^T k) * beta)``, ``o = S^T q``. Several tokens run as the chunked
        scan of ``torch_chunk_gated_delta_rule`` (chunks of 64), one token as the recurrence of
        ``torch_recurrent_gated_delta_rule``; both give the same values up to float32 rounding.

        Args:
            qkv: float32 [T, 2 nk dk + nv dv]: q heads, k heads, v heads (after the conv).
            ba: float32 [T, 2 nv]: ``b`` (beta's logits) then ``a``.
            A_log, dt_bias: float32 [nv].
            state: float32 [nv, dk, dv], the recurrent state before the tokens (zeros at the
                start).  new_state: float32 [nv, dk, dv], written with the state after them;
                must not alias ``state``.
        Returns:
            float32 [T, nv * dv], the core attention output per head.
        Raises:
            ValueError: shapes that disagree (:func:`check_gated_delta`).
        """
        raise NotImplementedError

    def rmsnorm_gated(self, x, w, z, eps, out=None):
        """``w * rmsnorm(x) * silu(z)`` per row (``Qwen3NextRMSNormGated``: norm before gate,
        float32).

        Args:
            x, z: float32 [R, n].  w: float32 [n].  eps: float (used as float32).
            out: optional float32 [R, n] (not aliasing ``x`` or ``z``).
        Returns:
            float32 [R, n] (``out`` when given).
        """
        raise NotImplementedError

    # -- LFM2-MoE: the gates of the short convolution ------------------------------------------

    def mul(self, a, b):
        """``a * b`` elementwise, a new float32 array (``Lfm2MoeShortConv``'s ``B * x`` and
        ``C * conv_out``).

        Args:
            a, b: float32 [T, n] (views of a wider array allowed).
        Returns:
            float32 [T, n], contiguous.
        """
        raise NotImplementedError

    # -- dense weights in the compute form (--resident compressed; design note §6.5) -----------

    def linear_weight(self, a):
        """A dense ``[out, in]`` host weight (BF16 bits, float16 or float32) as :meth:`linear`,
        :meth:`swiglu` and (a tied head) :meth:`embed` take it: :meth:`from_host` here; after
        :meth:`with_dense_form` ``("compressed")`` a BF16 one may be a
        :class:`~zipmoe_rt.models.packed.PackedMatrix`."""
        return self.from_host(np.ascontiguousarray(a))

    def with_dense_form(self, form: str):
        """This backend with :meth:`linear_weight` holding BF16 weights in ``form`` (``"bf16"``,
        or ``"compressed"``: the compute form where the backend computes from it; others keep
        BF16 and return ``self``). Raises ValueError for any other ``form``."""
        if form not in ("bf16", "compressed"):
            raise ValueError(f"dense form: {form!r} is not one of bf16, compressed")
        return self

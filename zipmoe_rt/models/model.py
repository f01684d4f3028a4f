"""The decoder skeleton shared by every family: the pre-norm residual layer and the causal LM
over a weight source (the ``*ForCausalLM`` classes of transformers' ``modeling_mixtral.py``,
``modeling_qwen2_moe.py``, ``modeling_qwen3_moe.py``, ``modeling_olmoe.py``,
``modeling_phimoe.py``). Hyper-parameters and tensor names come
from the family's registry entry (:mod:`zipmoe_rt.families`); family modules subclass
:class:`Model` and build each layer's feed-forward block; every array and compute op goes
through the model's backend (:mod:`zipmoe_rt.backends`).
"""
from __future__ import annotations

import numpy as np

from ..backends import Backend, get_backend, to_f32
from ..families import get_family
from .attention import Attention
from .cache import ModelCache
from .moe import MLP, ExpertExecutor, RouteHook
from .rope import RoPE

#: prompt tokens run in one batch by :meth:`Model.forward` with ``last_only`` (llama.cpp's
#: default ``n_ubatch``); a memory limit counts the activations of one such batch
PREFILL_UBATCH = 512


class Norm:
    """A decoder norm: RMSNorm (``MixtralRMSNorm``, ``backend.rmsnorm``) or, with a ``bias``,
    LayerNorm with weight and bias (``nn.LayerNorm`` of ``PhimoeDecoderLayer`` and
    ``PhimoeModel.norm``, ``backend.layer_norm``).

    Args:
        weight: [n] (any float dtype / BF16 bits).  eps: epsilon (used as float32).
        bias: None (RMSNorm) or [n] (LayerNorm).  backend: compute backend (default numba).
    Raises:
        ValueError: a bias of another size than the weight.
    """

    def __init__(self, weight, eps: float, bias=None, backend=None):
        be = self.backend = get_backend(backend)
        self.weight = be.from_host(to_f32(weight))
        self.bias = None if bias is None else be.from_host(to_f32(bias))
        if self.bias is not None and self.bias.shape != self.weight.shape:
            raise ValueError(f"norm bias {self.bias.shape} and weight {self.weight.shape} differ")
        self.eps = np.float32(eps)

    def __call__(self, x, out=None):
        """float32 [T, n] -> float32 [T, n] (``out`` when given; it may not alias ``x``)."""
        if self.bias is None:
            return self.backend.rmsnorm(x, self.weight, self.eps, out=out)
        return self.backend.layer_norm(x, self.weight, self.bias, self.eps, out=out)


class DecoderLayer:
    """Pre-norm residual layer (``MixtralDecoderLayer``):
    ``x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))``, each branch
    scaled by ``residual_multiplier`` first when it is not 1 (``GraniteMoeDecoderLayer``:
    ``residual + hidden_states * residual_multiplier``).

    Args:
        attn: :class:`~zipmoe_rt.models.attention.Attention`.  mlp: a
            :class:`~zipmoe_rt.models.moe.SparseMoeBlock` or :class:`~zipmoe_rt.models.moe.MLP`
            (any callable float32 [T, H] -> [T, H]).  input_norm, post_norm: [H] RMSNorm
            weights, or :class:`Norm` objects (a LayerNorm for PhiMoE).
        eps: RMSNorm epsilon (for weights).  backend: compute backend (default numba).
        residual_multiplier: the branch scale (1.0: none).
    Attributes:
        input_layernorm, post_attention_layernorm: the two :class:`Norm` objects.
        input_norm, post_norm: their weights (float32 [H]).
        lookahead: None, or ``f(x)`` called with the residual stream (float32 [T, H]) before
            the feed-forward norm; the expert engine's cross-layer prefetch sets it
            (:func:`zipmoe_rt.engine.prefetch.attach`). It must not modify ``x``.
    """

    def __init__(self, attn: Attention, mlp, input_norm, post_norm, eps: float, backend=None,
                 residual_multiplier: float = 1.0):
        be = self.backend = get_backend(backend)
        self.attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = (
            n if isinstance(n, Norm) else Norm(n, eps, backend=be) for n in (input_norm, post_norm))
        self.input_norm = self.input_layernorm.weight        # the weights, float32 [H]
        self.post_norm = self.post_attention_layernorm.weight
        self.eps = np.float32(eps)
        self.residual_multiplier = float(residual_multiplier)
        self.lookahead = None

    def _branch(self, y):
        """A branch's output [T, H], scaled in place by ``residual_multiplier`` unless 1."""
        if self.residual_multiplier != 1.0:
            self.backend.scale_(y, self.residual_multiplier)
        return y

    def __call__(self, x, cache, pos0, cos, sin):
        """x float32 [T, H], updated in place and returned; ``cache`` is this layer's cache
        (:meth:`Attention.new_cache`)."""
        be = self.backend
        h = self.input_layernorm(x)
        be.add_(x, self._branch(self.attn(h, cache, pos0, cos, sin)))
        if self.lookahead is not None:
            self.lookahead(x)
        self.post_attention_layernorm(x, out=h)
        be.add_(x, self._branch(self.mlp(h)))
        return x


class Model:
    """A decoder-only MoE language model over a weight source (the ``*ForCausalLM`` classes).

    The family's registry entry (:func:`zipmoe_rt.families.get_family` of
    ``hparams["family"]``) gives the typed hyper-parameters (its ``hparams_class``) and every
    tensor name (:meth:`~zipmoe_rt.families.Family.tensor_name`, logical keys such as
    ``"attn_q"``); subclasses (one module per family) build each layer's feed-forward block in
    :meth:`build_mlp`. Dense weights are fetched from the source once, here; expert weights are
    fetched by the executor on every use. The dense linears go through
    :meth:`~zipmoe_rt.backends.base.Backend.linear_weight`: for a source whose ``resident`` is
    ``"compressed"`` the model computes on ``backend.with_dense_form("compressed")``, which
    holds them in the compute form where the backend computes from it (design note §6.5).

    Scalar multipliers, taken from ``args`` where the family has them (Granite's
    ``GraniteMoeModel`` / ``GraniteMoeForCausalLM``; 1.0 or absent: not applied):
    ``embedding_multiplier`` (embeddings times it), ``residual_multiplier``
    (:class:`DecoderLayer`), ``attention_multiplier`` (the softmax scale instead of
    ``head_dim ** -0.5``) and ``logits_scaling`` (logits divided by it).

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource`.
        executor: an :class:`~zipmoe_rt.models.moe.Executor`; default
            :class:`~zipmoe_rt.models.moe.ExpertExecutor` over ``source`` on ``backend``.
        backend: compute backend: a name (``"numba"``, the default; ``"numpy"``) or a
            :class:`~zipmoe_rt.backends.base.Backend` (:func:`~zipmoe_rt.backends.get_backend`).
    Attributes:
        fam: the family's registry class (:class:`~zipmoe_rt.families.Family` subclass).
        args / config: its :class:`~zipmoe_rt.families.HParams` subclass instance
            (``config.vocab_size`` etc.; :meth:`~zipmoe_rt.families.HParams.window` per layer).
        hparams: the source's dict.
        backend: the :class:`~zipmoe_rt.backends.base.Backend` every op runs on.
        executor: swappable.
        route_hook: None or ``f(layer, x, logits, topk_idx, topk_w)`` called before experts run.
        layers: list of :class:`DecoderLayer` (``layers[i].mlp`` is a
            :class:`~zipmoe_rt.models.moe.SparseMoeBlock` for MoE layers, whose
            ``router_logits`` an engine may use for prefetching).
    Raises:
        KeyError: a dense tensor is missing.  ValueError: an unknown family (UnknownFamilyError),
        inconsistent hparams, an unknown backend, or an executor computing on another backend.
    """

    def __init__(self, source, executor=None, backend=None):
        self.source = source
        self.hparams = dict(source.hparams)
        self.fam = get_family(self.hparams.get("family"))
        self.args = self.fam.hparams_class.from_hparams(self.hparams)
        self.config = self.args
        be = self.backend = get_backend(backend)
        eb = getattr(executor, "backend", None)
        if isinstance(eb, Backend) and eb.name != be.name:
            raise ValueError(f"the executor computes on backend {eb.name!r}, the model on "
                             f"{be.name!r}: build both with the same backend")
        self.executor = executor if executor is not None else ExpertExecutor(source, be)
        if getattr(source, "resident", "full") == "compressed":
            # dense linears in the compute form too, where the backend computes from it
            be = self.backend = be.with_dense_form("compressed")
        self.route_hook: RouteHook | None = None
        a = self.args
        self.rope = self.build_rope()
        # As transformers' tie_weights: a stored lm_head.weight is the head (tied or not: a
        # tied config whose stored head differs from the embedding is not tied); without one
        # the head is the embedding only when tie_word_embeddings says so. A tied table is a
        # linear weight (the compute form, where the backend holds one, gathers decoded rows).
        head = self.tensor_name("lm_head")
        if source.has(head):
            self.embed = be.from_host(np.ascontiguousarray(self.weight("embed")))
            self.lm_head = be.linear_weight(source.tensor(head))
        elif a.tie_word_embeddings:
            self.embed = self.lm_head = be.linear_weight(self.weight("embed"))
        else:
            raise KeyError(f"no tensor {head!r} in the weight source, and "
                           "tie_word_embeddings is false: the output head is missing")
        self.final_norm = self.build_norm("norm")
        self.norm = self.final_norm.weight
        self.lm_head_bias = (be.from_host(to_f32(self.weight("lm_head_bias")))
                             if getattr(a, "lm_head_bias", False) else None)
        self.moe_layers = set(a.moe_layers)
        self.layers = [self.build_layer(i) for i in range(a.num_hidden_layers)]

    # -- weights -------------------------------------------------------------------------------

    def tensor_name(self, key: str, layer: int | None = None) -> str:
        """The checkpoint name of tensor ``key`` (a logical key of
        :data:`zipmoe_rt.families.KEYS`) of ``layer``, from the family's registry entry.

        Raises:
            KeyError: the family lists no such key.
        """
        return self.fam.tensor_name(key, layer)

    def weight(self, key: str, layer: int | None = None):
        """Dense tensor ``key`` of ``layer`` from the source (:meth:`tensor_name`).

        Raises:
            KeyError: the family lists no such key, or the source lacks the tensor.
        """
        return self.source.tensor(self.tensor_name(key, layer))

    def has_weight(self, key: str, layer: int | None = None) -> bool:
        """Whether the family lists tensor ``key`` and the source holds it for ``layer``."""
        return key in self.fam.tensor_table() and self.source.has(self.tensor_name(key, layer))

    def _opt(self, key, layer):
        """Tensor ``key`` of ``layer`` when :meth:`has_weight`, else None."""
        return self.weight(key, layer) if self.has_weight(key, layer) else None

    def _first(self, *names):
        """The first of the checkpoint ``names`` the source holds (e.g. the names of
        :meth:`~zipmoe_rt.families.Family.tensor_names`). Raises KeyError when none."""
        for n in names:
            if self.source.has(n):
                return self.source.tensor(n)
        raise KeyError(f"none of {names} in the weight source")

    def build_rope(self) -> RoPE:
        """The rotary embedding (:class:`~zipmoe_rt.models.rope.RoPE` of the args; a family
        whose rotary embedding differs passes its options)."""
        return RoPE(self.args)

    def build_norm(self, key: str, layer: int | None = None) -> Norm:
        """Norm ``key`` (``attn_norm``, ``ffn_norm``, ``norm``) of ``layer``: RMSNorm, or a
        LayerNorm with the bias ``<key>_bias`` when the family's ``HParams.NORM`` is
        ``"layer"``; epsilon ``rms_norm_eps``.

        Raises:
            KeyError: the source lacks the weight or bias.
        """
        bias = self.weight(key + "_bias", layer) if self.args.NORM == "layer" else None
        return Norm(self.weight(key, layer), self.args.rms_norm_eps, bias, self.backend)

    def build_attention(self, i: int, **options) -> Attention:
        """Attention of layer ``i``: q/k/v/o weights (``attn_q`` ... ``attn_o``), the biases
        the family lists and the source holds (``attn_q_bias`` ...; q/k/v biases looked up with
        ``attention_bias`` or when the source has a q bias), and with ``qk_norm`` the q/k norm
        weights (``attn_q_norm``, ``attn_k_norm``; their size says per head or whole
        projection). ``options`` go to :class:`~zipmoe_rt.models.attention.Attention` as they
        are (a family's override passes e.g. ``clip``)."""
        t = self.weight
        kw = {}
        if self.args.attention_bias or self.has_weight("attn_q_bias", i):
            kw.update(bq=self._opt("attn_q_bias", i), bk=self._opt("attn_k_bias", i),
                      bv=self._opt("attn_v_bias", i))
        kw["bo"] = self._opt("attn_o_bias", i)
        if self.args.qk_norm:
            kw.update(q_norm=t("attn_q_norm", i), k_norm=t("attn_k_norm", i))
        scale = getattr(self.args, "attention_multiplier", None)
        if scale is not None:
            options.setdefault("scale", scale)
        return Attention(self.args, i, t("attn_q", i), t("attn_k", i), t("attn_v", i),
                         t("attn_o", i), backend=self.backend, **kw, **options)

    def build_mlp(self, i: int):
        """The feed-forward block of layer ``i`` (family specific)."""
        raise NotImplementedError

    def build_layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` (attention, feed-forward block, both norms: ``attn_norm``,
        ``ffn_norm``, :meth:`build_norm`)."""
        return DecoderLayer(self.build_attention(i), self.build_mlp(i),
                            self.build_norm("attn_norm", i), self.build_norm("ffn_norm", i),
                            self.args.rms_norm_eps, self.backend,
                            getattr(self.args, "residual_multiplier", 1.0))

    def dense_mlp(self, i: int, keys=("mlp_gate", "mlp_up", "mlp_down")) -> MLP:
        """:class:`~zipmoe_rt.models.moe.MLP` of layer ``i`` from the tensors of the logical
        ``keys`` (gate, up, down): ``("mlp_gate", "mlp_up", "mlp_down")`` for a dense layer,
        ``("shared_gate", "shared_up", "shared_down")`` for a shared expert.

        Raises:
            KeyError: the family lists no such key, or the source lacks the tensor.
        """
        gate, up, down = (self.weight(k, i) for k in keys)
        return MLP(gate, up, down, self.backend)

    def shared_mlp(self, i: int) -> MLP | None:
        """The shared experts of sparse layer ``i`` as one :class:`~zipmoe_rt.models.moe.MLP`
        (``shared_gate``, ``shared_up``, ``shared_down``; width
        ``shared_expert_intermediate_size``, i.e. ``n_shared_experts * moe_intermediate_size``
        where the family counts experts), or None when that width is 0. Without a gate of their
        own they are added to the routed output as they are (DeepSeek-V2/V3's and GLM-4-MoE's
        ``shared_experts``, ERNIE 4.5's ``shared_experts``, Granite-MoE-Shared's
        ``shared_mlp``).

        Raises:
            KeyError: the family lists no such key, or the source lacks the tensor.
        """
        if self.args.shared_expert_intermediate_size <= 0:
            return None
        return self.dense_mlp(i, ("shared_gate", "shared_up", "shared_down"))

    # -- inference -----------------------------------------------------------------------------

    def new_cache(self, capacity: int = 256, max_tokens: int | None = None) -> ModelCache:
        """An empty :class:`~zipmoe_rt.models.cache.ModelCache`: one layer cache per decoder
        layer, each from its attention (:meth:`Attention.new_cache`).

        Args:
            capacity: positions allocated up front (the caches grow by doubling past it).
            max_tokens: the most positions the caller will store, if known: the initial
                allocation is then ``min(capacity, max_tokens)`` (a short run does not hold
                ``capacity`` positions of every layer: 12 MB for the default model).
        """
        if max_tokens is not None:
            capacity = max(1, min(capacity, int(max_tokens)))
        return ModelCache(layer.attn.new_cache(capacity) for layer in self.layers)

    def embed_tokens(self, ids: np.ndarray):
        """float32 [T, H] embedding rows (BF16 rows widened on the fly), times
        ``embedding_multiplier`` where the family has one that is not 1.

        Raises:
            IndexError: an id outside the vocabulary.
        """
        x = self.backend.embed(self.embed, ids)
        m = getattr(self.args, "embedding_multiplier", 1.0)
        if m != 1.0:
            self.backend.scale_(x, m)
        return x

    def logits(self, h):
        """Final norm + lm_head (with its bias, when the family has ``lm_head_bias``):
        float32 [T, H] -> float32 [T, vocab] (backend arrays), divided by ``logits_scaling``
        where the family has one that is not 1, soft-capped where it sets
        ``final_logit_softcapping`` (``backend.softcap_``)."""
        out = self.backend.linear(self.final_norm(h), self.lm_head, self.lm_head_bias)
        d = getattr(self.args, "logits_scaling", 1.0)
        if d != 1.0:
            self.backend.scale_(out, d, divide=True)
        cap = getattr(self.args, "final_logit_softcapping", None)
        if cap is not None:     # Gemma 4: tanh(logits / cap) * cap
            self.backend.softcap_(out, cap)
        return out

    def forward(self, ids, cache: ModelCache, last_only: bool = True,
                interrupt=None) -> np.ndarray:
        """Run tokens ``ids`` after the ``cache.offset`` tokens already in ``cache`` and append
        their keys/values (``cache.offset += T`` once every layer ran).

        When the RoPE regime of the sequence's new length (:meth:`RoPE.regime
        <zipmoe_rt.models.rope.RoPE.regime>`: longrope past ``original_max_position_embeddings``)
        differs from the one the cached keys were rotated in, the whole sequence (the cache's
        ``token_ids``, then ``ids``) is recomputed into a fresh cache that then replaces the
        contents of ``cache``: the logits are those of a full recompute, as transformers'
        ``PhimoeForCausalLM.prepare_inputs_for_generation`` drops its cache at the switch.

        Args:
            ids: int [T] token ids (T >= 1).
            cache: from :meth:`new_cache`.
            last_only: return only the last position's logits; then a prompt of more than
                :data:`PREFILL_UBATCH` tokens runs in batches of that many (the same logits up
                to float32 summation order, with the activations of one batch).
            interrupt: None, or a callable (no arguments) called before each decoder layer
                runs, in every batch; an exception it raises stops the call there and
                propagates. The cache then holds what it held before the batch that was
                running (the commit protocol of :class:`~zipmoe_rt.models.cache.ModelCache`);
                the batches before it stay committed. :func:`~zipmoe_rt.generate.generate`
                passes one that raises once a request is cancelled (a server client gone), so a
                cancelled prefill stops within one layer.
        Returns:
            host float32 [vocab] (last_only) or [T, vocab] logits.
        Raises:
            ValueError: empty ``ids``, a cache of another layer count, or a regime switch over a
            cache whose token ids are unknown.  IndexError: an id outside the vocabulary.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("forward: no tokens")
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"forward: the cache has {len(cache.layers)} layers, the model "
                             f"{len(self.layers)}")
        if last_only and T > PREFILL_UBATCH:
            # a long prompt runs in batches (llama.cpp's n_ubatch): the activations stay those
            # of PREFILL_UBATCH tokens, which a memory limit counts (engine/limit.py)
            for i in range(0, T, PREFILL_UBATCH):
                out = self.forward(ids[i:i + PREFILL_UBATCH], cache, True, interrupt)
            return out
        pos0 = cache.offset
        regime = self.rope.regime(pos0 + T)
        if pos0 and regime != cache.regime:
            held = cache.token_ids
            if held is None:
                raise ValueError("forward: the RoPE regime changes at this length and the "
                                 "cache's token ids are unknown: cannot recompute its keys")
            fresh = self.new_cache(capacity=pos0 + T)
            out = self.forward(np.concatenate([np.asarray(held, np.int64), ids]), fresh,
                               last_only, interrupt)
            cache.adopt(fresh)
            return out if last_only else out[pos0:]
        be = self.backend
        x = self.embed_tokens(ids)
        cache.reserve(T)
        cos, sin = be.upload(*self.rope.cos_sin(pos0, T))
        for layer, layer_cache in zip(self.layers, cache.layers):
            if interrupt is not None:
                interrupt()
            layer(x, layer_cache, pos0, cos, sin)
        cache.commit(T, ids, regime)
        if last_only:
            return be.to_host(self.logits(x[T - 1:]))[0]
        return be.to_host(self.logits(x))

    __call__ = forward

"""Sizing a model from its ``config.json`` alone, before any weight is downloaded: parameters
and BF16 bytes of the experts and of the dense tensors, the expected ``.zmoe`` size, the KV
cache's bytes per token and how a ``--memory-budget`` would be divided (``zipmoe-rt plan``).

Everything comes from the family registry (:mod:`zipmoe_rt.families`): the family's typed
hyper-parameters read from config.json with transformers' class defaults for absent keys, and
its :meth:`~zipmoe_rt.families.base.Family.tensor_specs`, which list every tensor transformers
creates for that config with its shape. The budget is divided by the engine's own
:func:`~zipmoe_rt.engine.pipeline.budget_split` and read by :func:`~zipmoe_rt.api.parse_size`,
run on a stand-in for the model file (:class:`ConfigSource`), so the figures are those
``zipmoe-rt run --memory-budget`` would use.

Importable without torch and Numba (a budget loads the engine's sizing code, which imports
Numba).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .plan_forms import (FP8_STORED_RATIO, MXFP4_STORED_RATIO,  # noqa: F401 (plan's API)
                         SOURCE_BYTES_PER_WEIGHT, fp8_line, held_bytes, mxfp4_line,
                         source_bytes, source_form)
from .plan_forms import mb as _mb

#: Stored bytes of the experts of a ``.zmoe`` file (bit-planes, Huffman-coded exponents, the
#: converter's defaults) per BF16 byte of the source, measured on the default model
#: (SmolLM2-135M-Instruct upcycled to a 4-expert Mixtral): 423,208,640 stored bytes for
#: 637,009,920 BF16 bytes (318,504,960 weights, 10.63 bits per weight). Measured with
#: ``zipmoe-rt inspect ~/.cache/zipmoe-rt/smollm2-135m-instruct-moe4.zmoe`` (its ``expert``
#: totals line; design note §1.2 and table 6 of docs/benchmarks.md give the same figure).
#: Trained models' exponents carry 2.55-2.65 bits (ZipMoE, arXiv 2601.21198), so other models
#: land within about a percent of it.
EXPERT_STORED_RATIO = 423_208_640 / 637_009_920


#: the most routed experts (MoE layers x experts per layer) a config may describe: 16x
#: DeepSeek-V3's 58 x 256 (every expert is one spec per projection in the listing).
MAX_EXPERTS = 1 << 18


class PlanError(ValueError):
    """A config.json that cannot be sized (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class _ExpertSize:
    """What :func:`~zipmoe_rt.engine.pipeline.budget_split` and
    :func:`~zipmoe_rt.api.parse_size` read of an expert layout."""

    full_bytes: int


class ConfigSource:
    """A stand-in for :class:`~zipmoe_rt.engine.store.ZmoeSource` built from hyper-parameters
    alone: the attributes the engine's budget sizing reads (``hparams``, ``layouts`` with each
    expert's ``full_bytes``, ``dense_bytes()``), each tensor counted as the runtime holds it
    (:func:`held_bytes`): BF16 as BF16, FP8 and MXFP4 weights dequantised to float32.

    Args:
        hparams: the model's :class:`~zipmoe_rt.families.hparams.HParams`.
        specs: its :class:`~zipmoe_rt.families.tensors.TensorSpec` list (HUB layout).
        quant: the config's ``quant_method`` (``"mxfp4"``), or None.
    """

    def __init__(self, hparams, specs, quant: str | None = None):
        self.hparams = hparams.to_hparams()
        block = getattr(hparams, "fp8_block_size", None)
        full: dict = {}
        self._dense = 0
        #: bytes of the release's file (its source encoding), experts and dense
        self.source = {True: 0, False: 0}
        #: expected stored bytes of the experts in a ``.zmoe``
        self.expert_stored = 0.0
        self.expert_source = 0          # expert bytes of the release
        ratio = {"bf16": EXPERT_STORED_RATIO, "f32": 1.0, "fp8": FP8_STORED_RATIO,
                 "mxfp4": MXFP4_STORED_RATIO}
        memo: dict = {}
        for s in specs:
            if s.tied:
                continue
            sig = (s.shape, s.key, s.role)
            if sig not in memo:
                form = source_form(s, block, quant)
                memo[sig] = (form, held_bytes(s, form), source_bytes(s, form, block))
            form, n, src = memo[sig]
            self.source[s.is_expert] += src
            if s.is_expert:     # a stacked tensor ([E, ...]: Granite, Gemma 4) is E experts'
                self.expert_stored += src * ratio[form]
                es = range(hparams.num_experts) if s.expert is None else (s.expert,)
                for e in es:
                    full[(s.layer, e)] = full.get((s.layer, e), 0) + n // len(es)
            else:
                self._dense += n
        self.layouts = {k: _ExpertSize(v) for k, v in full.items()}
        #: expected stored bytes of one expert (tier C): the experts' stored bytes shared out
        self.expert_compressed = math.ceil(self.expert_stored / max(len(full), 1))

    def dense_bytes(self) -> int:
        """Bytes of all dense tensors as the runtime holds them (a tied head is not stored)."""
        return self._dense


@dataclass
class BudgetPlan:
    """How a memory budget divides (bytes), as ``run --memory-budget`` divides it.

    Attributes:
        budget: the budget.  dense: the dense weights (always resident).
        working_set: the top-k experts of one token, decoded (``k x expert_full``).
        tiers: what is left for the expert cache tiers (F/C/S/E).
        expert_full: one expert decoded (tier F).  expert_compressed: one expert in tier C
            (both planes, at :data:`EXPERT_STORED_RATIO`).
        full_experts: experts the tiers hold decoded (``tiers // expert_full``: ``zip-lru``'s
            cache).  compressed_experts: experts the tiers hold in tier C.
    """

    budget: int
    dense: int
    working_set: int
    tiers: int
    expert_full: int
    expert_compressed: int
    full_experts: int
    compressed_experts: int


@dataclass
class SizePlan:
    """What ``zipmoe-rt plan`` prints (bytes are BF16 source bytes unless noted).

    Attributes:
        config: the config.json read.  architecture, family: its architecture and family.
        hparams: the typed hyper-parameters (transformers' defaults filled in).
        expert_params, dense_params: weights of the routed experts and of everything else
            (embedding, attention, norms, routers, shared experts, dense MLPs, an untied head).
        experts: routed experts in the model (expert blocks of the file).
        expert_bytes, dense_bytes: BF16 bytes of each group.
        zmoe_bytes: expected tensor data of the ``.zmoe`` from the release's own encoding
            (experts at :data:`EXPERT_STORED_RATIO` of BF16, :data:`FP8_STORED_RATIO` of FP8,
            :data:`MXFP4_STORED_RATIO` of MXFP4; dense as the release stores them); the index
            (metadata, tokenizer) and alignment padding come on top.
        kv_values_per_token: values the KV cache holds per token, all layers.
        kv_bytes_per_token: the same in bytes (float32 cache).
        budget: the budget split, or None.
        state_values: values of the fixed per-sequence state of linear-attention layers (one
            copy; Qwen3-Next's Gated DeltaNet), 0 without such layers.
        state_bytes: bytes the runtime allocates for it (float32, the copies a
            :class:`~zipmoe_rt.models.cache.RecurrentCache` holds).
        quantized: the config's ``quantization_config.quant_method`` (``"mxfp4"`` for
            gpt-oss's release), or None: the BF16 figures are then those of a BF16 copy.
    """

    config: Path
    architecture: str
    family: str
    hparams: object
    expert_params: int
    dense_params: int
    experts: int
    expert_bytes: int
    dense_bytes: int
    zmoe_bytes: int
    kv_values_per_token: int
    kv_bytes_per_token: int
    budget: BudgetPlan | None = None
    state_values: int = 0
    state_bytes: int = 0
    quantized: str | None = None
    source_bytes: int = 0
    source_dense_bytes: int = 0

    @property
    def params(self) -> int:
        """All parameters (a tied head counted once, as ``model.parameters()`` does)."""
        return self.expert_params + self.dense_params

    def as_dict(self) -> dict:
        """The plan as JSON-ready values (``--json``)."""
        hp = self.hparams
        out = {"config": str(self.config), "architecture": self.architecture,
               "family": self.family, "layers": hp.num_hidden_layers,
               "experts_per_layer": hp.num_experts, "experts_per_token": hp.num_experts_per_tok,
               "moe_layers": len(hp.moe_layers), "experts": self.experts,
               "params": self.params, "expert_params": self.expert_params,
               "dense_params": self.dense_params, "bf16_bytes": self.expert_bytes
               + self.dense_bytes, "expert_bytes": self.expert_bytes,
               "dense_bytes": self.dense_bytes, "expert_stored_ratio": EXPERT_STORED_RATIO,
               "zmoe_bytes": self.zmoe_bytes, "kv_values_per_token": self.kv_values_per_token,
               "kv_bytes_per_token": self.kv_bytes_per_token,
               "max_position_embeddings": hp.max_position_embeddings,
               "state_values": self.state_values, "state_bytes": self.state_bytes,
               "quantized": self.quantized, "source_bytes": self.source_bytes}
        if self.budget is not None:
            out["budget"] = dict(vars(self.budget))
        return out


def _is_container(path: Path) -> bool:
    """Whether ``path`` starts with the ``.zmoe`` magic (format/SPEC.md §2)."""
    from zmoe.constants import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _container_config(path: Path) -> dict:
    """The source config.json a ``.zmoe`` stores (``hf.config``, format/SPEC.md §3).

    Raises:
        PlanError: the container cannot be opened, or holds no config (named).
    """
    from zmoe.constants import Keys
    from zmoe.errors import ZmoeError
    from zmoe.reader import ZmoeReader

    try:
        with ZmoeReader(path, use_mmap=False) as r:
            config = r.metadata.get(Keys.HF.CONFIG)
    except (ZmoeError, OSError) as e:
        msg = str(e)                            # the reader's errors name the file already
        raise PlanError(msg if str(path) in msg else f"{path}: {msg}") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path}: the container holds no config.json ({Keys.HF.CONFIG})")
    return config


def read_config(path) -> tuple[Path, dict]:
    """The parsed config.json at ``path`` (the file, or a folder holding ``config.json``), or
    the one a ``.zmoe`` container stores.

    Raises:
        FileNotFoundError: no such file or folder, or a folder without config.json.
        PlanError: not UTF-8 JSON, not a JSON object, ``architectures`` not a list of
            names, or a container (a file starting with the ``.zmoe`` magic, or any file named
            ``*.zmoe``) that cannot be read: the container reader's message, e.g. ``not a
            .zmoe file (the file is empty)`` (the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(2, "no such file", str(path))
    if not path.is_file():
        raise PlanError(f"{path}: not a regular file (give a config.json or a folder holding one)")
    if _is_container(path) or path.suffix.lower() == ".zmoe":
        # a .zmoe by its name or its magic: the container reader's error, as every other
        # command gives it ("not a .zmoe file (the file is empty)"), not a JSON one
        return path, _container_config(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        from zmoe.reader import sniff_kind
        with open(path, "rb") as f:
            kind = sniff_kind(f.read(16))
        kind = None if kind == "JSON text" else kind       # a broken config.json: say where
        raise PlanError(f"{path}: not a JSON config ("
                        + (f"it is {kind}; give the Hugging Face folder's config.json or a .zmoe"
                           if kind else str(e)) + ")") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path}: not a JSON object")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise PlanError(f"{path}: architectures must be a list of class names, not "
                        f"{str(archs)[:40]!r}")
    return path, config


def size_plan(path, memory_budget=None) -> SizePlan:
    """Size the model of a config.json (see the module docstring).

    Args:
        path: config.json, or a folder holding one.
        memory_budget: None, or a budget as ``run --memory-budget`` takes it (bytes, ``"600MB"``,
            ``"25%"`` = dense + 25 % of the experts' BF16 bytes; :func:`~zipmoe_rt.api.parse_size`).
    Returns:
        a :class:`SizePlan`.
    Raises:
        FileNotFoundError, PlanError: see :func:`read_config`; a model without routed experts
            given a budget.
        zipmoe_rt.families.UnsupportedArchitectureError: an architecture no family handles
            (the message lists those that are).
        zipmoe_rt.families.ConfigError: a missing or invalid field (named).
        zipmoe_rt.engine.tiers.BudgetError: a budget below the dense weights plus one token's
            experts (the message gives the minimum).
        ValueError: an unreadable budget.
    """
    from .engine.memparts import state_bytes
    from .families import get_architecture
    from .models.cache import KV_DTYPE

    path, config = read_config(path)
    try:
        fam = get_architecture(config)
        hp = fam.typed_hparams()
        n_expert = len(hp.moe_layers) * hp.num_experts
        if n_expert > MAX_EXPERTS:      # listed one by one below: bound the work a file asks
            raise PlanError(f"{path}: {len(hp.moe_layers)} MoE layers x {hp.num_experts} "
                            f"experts = {n_expert:,} experts, more than the {MAX_EXPERTS:,} "
                            f"this planner lists")
        specs = fam.tensor_specs(hp)
    except PlanError:           # names the file already
        raise
    except ValueError as e:     # UnsupportedArchitectureError, ConfigError: name the file
        msg = str(e).removeprefix("config.json: ")
        raise type(e)(f"{path}: {msg}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:   # a value of a wrong kind
        raise PlanError(f"{path}: cannot be read as a model config ({type(e).__name__}: "
                        f"{str(e)[:80]})") from None
    groups = {True: 0, False: 0}
    for s in specs:
        if not s.tied:
            groups[s.is_expert] += math.prod(s.shape)
    q = config.get("quantization_config")
    quant = q["quant_method"][:40] if isinstance(q, dict) and isinstance(
        q.get("quant_method"), str) else None
    src = ConfigSource(hp, specs, quant)
    kv = int(hp.kv_values_per_token())
    plan = SizePlan(
        config=path, architecture=fam.name, family=fam.family, hparams=hp,
        expert_params=groups[True], dense_params=groups[False], experts=len(src.layouts),
        expert_bytes=groups[True] * SOURCE_BYTES_PER_WEIGHT,
        dense_bytes=groups[False] * SOURCE_BYTES_PER_WEIGHT,
        zmoe_bytes=src.source[False] + round(src.expert_stored),
        kv_values_per_token=kv, kv_bytes_per_token=kv * np.dtype(KV_DTYPE).itemsize,
        state_values=int(getattr(hp, "state_values", lambda: 0)()), state_bytes=state_bytes(hp),
        quantized=quant, source_bytes=src.source[True] + src.source[False],
        source_dense_bytes=src.source[False])
    if memory_budget is not None:
        plan.budget = budget_plan(src, memory_budget, path)
    return plan


def budget_plan(source, memory_budget, where="config.json") -> BudgetPlan:
    """How ``memory_budget`` divides for ``source`` (a :class:`ConfigSource`, or a
    :class:`~zipmoe_rt.engine.store.ZmoeSource`): :func:`~zipmoe_rt.api.parse_size` then the
    engine's :func:`~zipmoe_rt.engine.pipeline.budget_split`.

    Raises:
        PlanError: no routed experts (``where`` names the file).  BudgetError, ValueError:
            see :func:`size_plan`.
    """
    from .api import parse_size
    from .engine.pipeline import budget_split

    if not source.layouts:
        raise PlanError(f"{where}: the model has no routed experts, a budget has nothing to "
                        f"divide")
    from .loading import budget_hint
    budget = parse_size(memory_budget, source)
    with budget_hint(memory_budget):
        full, k, tiers = budget_split(source, budget)
    comp = getattr(source, "expert_compressed", None) or math.ceil(full * EXPERT_STORED_RATIO)
    return BudgetPlan(budget=budget, dense=source.dense_bytes(), working_set=k * full,
                      tiers=tiers, expert_full=full, expert_compressed=comp,
                      full_experts=min(tiers // full, len(source.layouts)),
                      compressed_experts=min(tiers // comp, len(source.layouts)))




def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def format_plan(p: SizePlan) -> str:
    """The plan as the lines ``zipmoe-rt plan`` prints."""
    hp = p.hparams
    total = p.expert_bytes + p.dense_bytes
    block = getattr(hp, "fp8_block_size", None)
    lowprec = "FP8" if block else "MXFP4" if p.quantized == "mxfp4" else None
    lines = [
        f"{p.config}: {p.architecture} ({p.family}), {hp.num_hidden_layers} layers "
        f"({len(hp.moe_layers)} MoE), {hp.num_experts} experts per MoE layer, top-"
        f"{hp.num_experts_per_tok}",
        f"parameters  {p.params:>17,d}  experts {p.expert_params:,d} "
        f"({_pct(p.expert_params, p.params)}), dense {p.dense_params:,d}",
        f"BF16 bytes  {_mb(total):>17}  experts {_mb(p.expert_bytes)}, dense {_mb(p.dense_bytes)}",
        f".zmoe       {_mb(p.zmoe_bytes):>17}  expected: experts at "
        + (f"~{_pct(p.zmoe_bytes - p.source_dense_bytes, p.source_bytes - p.source_dense_bytes)}"
           f" of their {lowprec} source" if lowprec else
           f"{100 * EXPERT_STORED_RATIO:.2f} % of BF16")
        + f" ({_mb(p.zmoe_bytes - p.source_dense_bytes)}), dense as stored "
        f"({_mb(p.source_dense_bytes)}), plus the index",
        f"KV cache    {p.kv_bytes_per_token:>11,d} B/token  {p.kv_values_per_token:,d} values x "
        f"{p.kv_bytes_per_token // max(p.kv_values_per_token, 1)} bytes (float32); "
        f"{_mb(p.kv_bytes_per_token * hp.max_position_embeddings)} at "
        f"{hp.max_position_embeddings:,d} tokens",
    ]
    if p.state_values:
        from .models.cache import RecurrentCache
        what = getattr(hp, "STATE_OF", "the conv and recurrent state of {n} linear-attention "
                                        "layers")
        lines.append(f"state       {_mb(p.state_bytes):>17}  per sequence, fixed: "
                     f"{what.format(n=len(hp.linear_layers()))} "
                     f"({p.state_values:,d} values, float32, {RecurrentCache.COPIES} copies)")
    if block:       # an FP8 release: the figures above are those of its BF16 copy
        lines.append(fp8_line(p.expert_params, block))
    elif p.quantized == "mxfp4":
        lines.append(mxfp4_line(p.expert_params))
    elif p.quantized:
        lines.append(f"note        config.json describes a quantised release (quant_method "
                     f"{p.quantized}): these are the figures of its BF16 weights")
    b = p.budget
    if b is not None:
        lines += [
            f"memory budget {_mb(b.budget)} (the KV cache "
            f"{'and the fixed state come' if p.state_values else 'comes'} on top):",
            f"  dense        {_mb(b.dense):>11}  always resident",
            f"  working set  {_mb(b.working_set):>11}  the {hp.num_experts_per_tok} experts of "
            f"one token, decoded ({_mb(b.expert_full)} each)",
            f"  expert tiers {_mb(b.tiers):>11}  {b.full_experts:,d} of {p.experts:,d} experts "
            f"decoded (zip-lru), or {b.compressed_experts:,d} in tier C ({_mb(b.expert_compressed)}"
            f" each);",
            f"{'':28}zipmoe mixes F/C/S/E per layer from a trace (zipmoe-rt profile)",
        ]
    return "\n".join(lines)

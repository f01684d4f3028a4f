"""Hugging Face checkpoint folder -> ``.zmoe`` (format/SPEC.md).

Streams tensor by tensor from memory-mapped safetensors, compresses expert blocks on all cores
(zstd releases the GIL), writes to a temporary file next to the output, verifies the result
bit for bit against the source, and only then renames it into place. On any error, or Ctrl-C,
the temporary file is removed and nothing else is touched.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import zmoe

from ..families import tensors as T
from .atomic import (StaleTemporaryWarning, WriteError, remove_stale_temporaries, stale_message,
                     temporary_name, write_error)
from .registry import ConfigError, UnsupportedArchitectureError, get_architecture
from .safetensors_io import Checkpoint, SafetensorsError
from .errors import ConversionError, ConversionWarning
from ..families.expert_roles import EXPERT_ROLE_SETS, expert_shapes
from .metadata import container_metadata, read_json
from . import lowprec


#: safetensors dtypes of the weights the runtime's kernels compute with (F8_E4M3 too for an
#: FP8 checkpoint: convert/lowprec.py)
WEIGHT_DTYPES = lowprec.WEIGHT_DTYPES


def _expected_expert_shape(role: str, hp: dict, stacked: bool) -> tuple:
    h, i = hp["hidden_size"], hp["moe_intermediate_size"]
    shape = {"gate": (i, h), "up": (i, h), "down": (h, i), "gate_up": (2 * i, h),
             **expert_shapes({"down_cols": (i, h)})}[role]     # gpt-oss's in x out slices
    return (hp["num_experts"],) + shape if stacked else shape


def plan_conversion(folder: Path):
    """Read config, tokenizer files and the tensor list; check names and shapes.

    Returns:
        (arch, hparams, checkpoint, dense_names, experts) where experts maps
        (layer, expert) -> [(name, ExpertRef)].
    Raises:
        ConversionError: unsupported architecture, missing shard or config key, a tensor whose
            shape does not match the config, a missing tensor (``lm_head.weight`` included when
            the config does not tie it to the embedding), a tensor name in two files.
    """
    config = read_json(folder / "config.json", required=True)
    try:
        arch = get_architecture(config)
        hp = arch.hparams()
    except (UnsupportedArchitectureError, ConfigError) as e:
        msg = str(e).removeprefix("config.json: ")      # the path below names the file
        raise ConversionError(f"{folder / 'config.json'}: {msg}") from None
    try:
        ckpt = Checkpoint(folder)
    except (FileNotFoundError, SafetensorsError) as e:
        raise ConversionError(str(e)) from None
    _check_layer_range(arch, hp, config, ckpt, folder)
    dense, experts = [], {}
    moe_layers = set(hp["moe_layers"])      # asked once per expert tensor
    for t in ckpt:
        why = arch.unsupported_tensor(t.name, t.dtype)
        if why is not None:
            raise ConversionError(f"{t.file}: {why}")
        ref = arch.expert_tensor(t.name)
        if ref is not None and ref.layer >= hp["num_hidden_layers"]:
            ref = None      # a layer past the decoder (GLM-4-MoE's / DeepSeek-V3's multi-token
            #                 prediction layer, which transformers skips): stored as it is, unused
        if ref is None:
            dense.append(t.name)
            continue
        lowprec.check_dtype(t, hp)
        if ref.layer not in moe_layers:
            raise ConversionError(f"{t.file}: tensor {t.name!r} is an expert of layer {ref.layer}, "
                                  f"which the config says is not a MoE layer")
        want = _expected_expert_shape(ref.role, hp, ref.expert is None)
        if tuple(t.shape) != want:
            from ..families import get_family      # the family's own config.json key names
            keys = get_family(hp.get("family")).hparams_class.CONFIG_KEYS
            inter = keys.get("moe_intermediate_size", ("moe_intermediate_size",))[0]
            raise ConversionError(f"{t.file}: tensor {t.name!r} has shape {list(t.shape)}, "
                                  f"expected {list(want)} from config.json "
                                  f"({inter}={hp['moe_intermediate_size']}, "
                                  f"hidden_size={hp['hidden_size']})")
        es = range(hp["num_experts"]) if ref.expert is None else [ref.expert]
        for e in es:
            if not 0 <= e < hp["num_experts"]:
                raise ConversionError(f"{t.file}: tensor {t.name!r}: expert index {e} out of range "
                                      f"(num_experts={hp['num_experts']})")
            experts.setdefault((ref.layer, e), []).append((t.name, ref))
    lowprec.attach_scales(arch, hp, ckpt, dense, experts)    # FP8 scales, MXFP4 blocks/scales
    for layer in hp["moe_layers"]:
        for e in range(hp["num_experts"]):
            roles = {ref.role for _, ref in experts.get((layer, e), [])}
            if not any(want <= roles for want in EXPERT_ROLE_SETS):
                if not roles:
                    tag = f".layers.{layer}."
                    if not any(tag in n for n in dense) and \
                            not any(l == layer for l, _ in experts):
                        raise ConversionError(
                            f"{folder}: the checkpoint has no tensors of layer {layer} at all, "
                            f"but config.json says num_hidden_layers={hp['num_hidden_layers']}: "
                            f"the config and the weights disagree on the number of layers; "
                            f"fix num_hidden_layers in config.json")
                    raise ConversionError(
                        f"{folder}: no tensors of layer {layer} expert {e}, which config.json "
                        f"makes a MoE layer of {hp['num_experts']} experts (a dense layer "
                        f"in the checkpoint, or the config's expert count (num_experts, "
                        f"num_local_experts or n_routed_experts) too large?)")
                near = min(EXPERT_ROLE_SETS, key=lambda w: (len(w - roles), sorted(w)))
                raise ConversionError(f"{folder}: layer {layer} expert {e} lacks tensors: "
                                      f"no {', '.join(sorted(near - roles))} "
                                      f"(has roles {sorted(roles)})")
    _check_dense_tensors(folder, arch, ckpt)
    return arch, hp, ckpt, dense, experts


def _check_layer_range(arch, hp: dict, config: dict, ckpt: Checkpoint, folder: Path) -> None:
    """Every decoder-layer tensor (``model.layers.N.*``, the family's own prefix) has a layer
    ``N`` the config has: below ``num_hidden_layers``, or one of the
    ``num_nextn_predict_layers`` multi-token-prediction layers right after them (GLM-4-MoE,
    DeepSeek-V3; stored, unused, as transformers skips them). A tensor of a layer past those
    means the config and the weights disagree on the architecture: converted, the layers the
    config leaves out would be stored unused and the model would compute something else.

    Also that every layer below ``num_hidden_layers`` has tensors (``folder`` is named when
    one has none), before anything is listed layer by layer.

    Raises:
        ConversionError: the first such tensor, its layer and the config field named; the
            first layer without tensors.
    """
    prefixes = set()
    for layout in T.LAYOUTS:    # the name templates, not every layer's names (O(layers) work)
        for template in arch.tensor_table(layout).values():
            m = _LAYER_NAME.match(template.format(i=0, e=0))
            if m and "{i}" in template:
                prefixes.add(m.group(1))
    if not prefixes:
        return
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    nextn = text.get("num_nextn_predict_layers")
    nextn = nextn if isinstance(nextn, int) and not isinstance(nextn, bool) and nextn > 0 else 0
    n = hp["num_hidden_layers"]
    seen = set()
    for t in ckpt:
        m = _LAYER_NAME.match(t.name)
        if m and m.group(1) in prefixes:
            seen.add(int(m.group(2)))
        if m and m.group(1) in prefixes and int(m.group(2)) >= n + nextn:
            from ..families import get_family      # the family's own config.json key name
            keys = get_family(hp.get("family")).hparams_class.CONFIG_KEYS
            key = keys.get("num_hidden_layers", ("num_hidden_layers",))[0]
            extra = f" + num_nextn_predict_layers={nextn}" if nextn else ""
            raise ConversionError(
                f"{t.file}: tensor {t.name!r} belongs to layer {m.group(2)}, but config.json "
                f"says {key}={n}{extra} (layers 0-{n + nextn - 1}): the config and the weights "
                f"disagree on the number of layers; fix {key} in config.json")
    missing = next((i for i in range(n) if i not in seen), None)
    if missing is not None:     # before any per-layer listing: a config of 65536 layers is cheap
        from ..families import get_family
        keys = get_family(hp.get("family")).hparams_class.CONFIG_KEYS
        key = keys.get("num_hidden_layers", ("num_hidden_layers",))[0]
        raise ConversionError(
            f"{folder}: the checkpoint has no tensors of layer {missing} at all, but "
            f"config.json says {key}={n}: the config and the weights disagree on the number "
            f"of layers; fix {key} in config.json")


#: a decoder-layer tensor name: (the prefix up to ``layers.``, the layer number)
_LAYER_NAME = re.compile(r"^(.*?\blayers\.)(\d+)\.")


#: logical tensor key -> the config.json field its shape depends on beyond hidden_size /
#: vocab_size / heads (named in shape errors).
_WIDTH_FIELD = {"shared_gate": "shared_expert_intermediate_size",
                "shared_up": "shared_expert_intermediate_size",
                "shared_down": "shared_expert_intermediate_size",
                "mlp_gate": "intermediate_size", "mlp_up": "intermediate_size",
                "mlp_down": "intermediate_size", "router": "num_experts",
                "embed": "vocab_size", "lm_head": "vocab_size"}


def _model_specs(arch) -> dict:
    """Every tensor name a model of ``arch``'s config may have in a checkpoint (either expert
    layout) -> :class:`~zipmoe_rt.families.tensors.TensorSpec` (HUB spec first)."""
    typed = arch.typed_hparams()
    specs: dict = {}
    for layout in T.LAYOUTS:
        for spec in arch.tensor_specs(typed, layout):
            specs.setdefault(spec.name, spec)
    return specs


def _check_dense_tensors(folder: Path, arch, ckpt: Checkpoint) -> None:
    """Every non-expert tensor the config implies is present with the shape it implies (as
    transformers' modeling code creates it); the output head follows ``tie_word_embeddings``.

    Raises:
        ConversionError: a tensor with another shape (tensor, both shapes and the config field
            named), or a missing tensor (named), ``lm_head.weight`` included when the config says
            the head is not tied to the embedding.
    """
    typed = arch.typed_hparams()
    specs = _model_specs(arch)
    hp = arch.hparams()
    for name, spec in specs.items():
        t = ckpt.tensors.get(name)
        if t is None or spec.is_expert:
            continue
        lowprec.check_dtype(t, hp)
        if tuple(t.shape) != tuple(spec.shape):
            field = _WIDTH_FIELD.get(spec.key)
            why = f" (config.json {field}={getattr(typed, field)})" if field else ""
            raise ConversionError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, but "
                                  f"config.json implies {list(spec.shape)}{why}")
    by_layer: dict = {}         # layer -> its dense keys, in spec order (one pass, not one per layer)
    for s in specs.values():
        if not s.is_expert and not s.tied:
            by_layer.setdefault(s.layer, {}).setdefault(s.key)
    for layer in [None] + list(range(typed.num_hidden_layers)):
        for key in by_layer.get(layer, {}):
            names = arch.tensor_names(key, layer)
            if any(n in ckpt.tensors for n in names):
                continue
            if key == "lm_head":
                raise ConversionError(
                    f"{folder}: no tensor 'lm_head.weight', and config.json says "
                    f"tie_word_embeddings: false, so the output head is not the embedding "
                    f"matrix: the checkpoint is incomplete (a missing shard?)")
            raise ConversionError(f"{folder}: no tensor {names[0]!r}, which config.json "
                                  f"implies" + (f" for layer {layer}" if layer is not None else ""))


def unused_tensors(arch, ckpt: Checkpoint) -> list[str]:
    """Checkpoint tensors a model of ``arch``'s config does not use (names outside the family's
    tensors for this config), in checkpoint order. A stored ``lm_head.weight`` is always used:
    transformers ties a tied config's head to the embedding only where it is absent or equal."""
    specs = _model_specs(arch)
    return [t.name for t in ckpt if t.name not in specs and not lowprec.is_used_scale(t.name, ckpt, arch)]


def _tied_head_differs(arch, ckpt: Checkpoint) -> bool:
    """config.json ties the head, yet the checkpoint stores an ``lm_head.weight`` that differs
    from the embedding (transformers then does not tie them and uses the stored head)."""
    head, embed = ckpt.tensors.get("lm_head.weight"), ckpt.tensors.get("model.embed_tokens.weight")
    if not arch.typed_hparams().tie_word_embeddings or head is None or embed is None:
        return False
    return not (head.dtype == embed.dtype and head.shape == embed.shape
                and np.array_equal(ckpt.raw(head.name), ckpt.raw(embed.name)))


def _expert_pieces(ckpt: Checkpoint, refs, expert: int) -> list:
    pieces = []
    for name, ref in refs:
        t = ckpt.tensors[name]
        raw = ckpt.raw(name)
        if ref.expert is None:  # stacked [E, ...]: this expert's contiguous slice
            n = raw.size // t.shape[0]
            pieces.append(zmoe.ExpertPiece(name, t.dtype, t.shape, ref.role,
                                           raw[expert * n:(expert + 1) * n], part=expert,
                                           encoding=lowprec.piece_encoding(ref.role)))
        else:
            pieces.append(zmoe.ExpertPiece(name, t.dtype, t.shape, ref.role, raw,
                                           encoding=lowprec.piece_encoding(ref.role)))
    return pieces


def verify_against(path: Path, ckpt: Checkpoint, progress: bool = False):
    """Decode every tensor of ``path`` and compare it byte for byte with the source checkpoint.

    Raises:
        ConversionError: a tensor missing or different (named).
    """
    with zmoe.ZmoeReader(path, use_mmap=False) as r:
        names = set(r.tensors)
        if names != set(ckpt.tensors):
            raise ConversionError(f"{path}: tensor set differs from the source "
                                  f"({sorted(set(ckpt.tensors) ^ names)[:5]})")
        for name in tqdm(list(r.tensors), desc="verify", unit="tensor", disable=not progress,
                         leave=False):
            got = r.read_tensor(name, verify=True).reshape(-1).view(np.uint8)
            if not np.array_equal(got, ckpt.raw(name)):
                raise ConversionError(f"{path}: tensor {name!r} does not round-trip (converter bug)")


def _warn_tokenizer_past_vocab(folder: Path, vocab_size: int) -> None:
    """Warn (ConversionWarning) when ``folder/tokenizer.json`` has ids at or past the model's
    ``vocab_size`` (its embedding rows): a prompt holding such an id cannot be run. A
    tokenizer that does not load is left to the metadata checks, which name it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    try:
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - reported by the metadata checks
        return
    if n > vocab_size:
        warnings.warn(f"{path}: {n} token ids, more than the model's vocab_size {vocab_size} "
                      f"(config.json): a prompt holding an id of {vocab_size} or more is refused "
                      f"at run time; is this the model's own tokenizer?", ConversionWarning,
                      stacklevel=3)


def convert(folder, output, chunks: int = zmoe.DEFAULT_CHUNKS, dense_encoding: str = "raw",
            threads: int | None = None, verify: bool = True, progress: bool = True,
            overwrite: bool = True, expert_encoding: str = "bitplane",
            exp_codec: str = zmoe.DEFAULT_EXP_CODEC) -> Path:
    """Convert an HF checkpoint folder to a ``.zmoe`` file.

    Args:
        folder: folder with config.json, safetensors (single or sharded + index), and optionally
            tokenizer.json, tokenizer_config.json / chat_template.jinja, generation_config.json.
        output: target path; written as ``output.tmp-<pid>`` and renamed when complete.
        chunks: K, exponent chunks per expert tensor (>= 1).
        dense_encoding: "raw" or "bitplane" for non-expert tensors.
        expert_encoding: "bitplane" (the point of the format) or "raw" (uncompressed experts,
            still in expert blocks: the baseline of the benchmarks).
        exp_codec: exponent-chunk codec of bit-plane tensors: "huffman" (default; SPEC §5.3,
            decodes ~2x faster than zstd at the same size) or "zstd".
        threads: compression threads (default: all cores).
        verify: decode the written file and compare every tensor with the source before renaming.
        progress: show a tqdm progress bar (bytes of the source).
        overwrite: replace an existing output.

    Returns: the output path.
    Raises:
        ConversionError: any problem with the input or the options (file/tensor/option named).
        zipmoe_rt.convert.atomic.WriteError: the output cannot be written (disk full, I/O error:
            the output and the reason named); the temporary file is removed, an existing
            output and the source are untouched.
    Warns:
        ConversionWarning: the folder has no tokenizer.json, its tokenizer.json has more ids
            than the model's vocab_size, it holds checkpoint tensors the model does not use
            (one warning listing them), or ``*.safetensors`` files transformers
            would not load (not read); the file is written all the same.
        StaleTemporaryWarning: ``output.tmp-<pid>`` files of earlier conversions killed
            outright (SIGKILL, a crash), whose process no longer runs, were found and removed.
    """
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    if chunks < 1:
        raise ConversionError(f"--chunks must be >= 1, got {chunks}")
    if dense_encoding not in (zmoe.ENC_RAW, zmoe.ENC_BITPLANE):
        raise ConversionError(f"--dense-encoding must be raw or bitplane, got {dense_encoding!r}")
    if expert_encoding not in (zmoe.ENC_RAW, zmoe.ENC_BITPLANE):
        raise ConversionError(f"--expert-encoding must be raw or bitplane, got {expert_encoding!r}")
    if exp_codec not in zmoe.EXP_CODECS:
        raise ConversionError(f"--exp-codec must be one of {', '.join(zmoe.EXP_CODECS)}, "
                              f"got {exp_codec!r}")
    if output.is_dir():
        raise ConversionError(f"{output}: is a folder; give a file name like model.zmoe")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output}: exists (pass --force to replace it)")
    arch, hp, ckpt, dense, experts = plan_conversion(folder)
    unused = unused_tensors(arch, ckpt)
    if unused:
        warnings.warn(f"{folder}: {len(unused)} checkpoint tensor(s) not used by a {arch.name} "
                      f"with this config.json (stored, but the model ignores them): "
                      f"{', '.join(unused)}", ConversionWarning, stacklevel=2)
    if _tied_head_differs(arch, ckpt):
        warnings.warn(f"{folder}: config.json says tie_word_embeddings: true, but lm_head.weight "
                      f"differs from model.embed_tokens.weight: the stored lm_head.weight is the "
                      f"output head (as transformers loads it)", ConversionWarning, stacklevel=2)
    if ckpt.unread:
        warnings.warn(f"{folder}: not read: {', '.join(ckpt.unread)} (transformers loads only "
                      f"model.safetensors or the shards model.safetensors.index.json lists)",
                      ConversionWarning, stacklevel=2)
    if not (folder / "tokenizer.json").exists():
        warnings.warn(f"{folder}: no tokenizer.json: {output} will hold the weights but "
                      f"`zipmoe-rt run/chat` and zipmoe_rt.load() need a tokenizer; copy the "
                      f"model's tokenizer.json (and tokenizer_config.json) into the folder and "
                      f"convert again", ConversionWarning, stacklevel=2)
    _warn_tokenizer_past_vocab(folder, hp["vocab_size"])
    output.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(output)
    if removed:
        warnings.warn(stale_message(removed), StaleTemporaryWarning, stacklevel=2)
    tmp = temporary_name(output)
    threads = threads or os.cpu_count() or 1
    total = sum(t.nbytes for t in ckpt)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {folder.name}",
               disable=not progress)
    try:
        w = zmoe.ZmoeWriter(tmp)
        try:
            for key, value, typ in container_metadata(folder, arch, hp, ckpt, chunks, exp_codec):
                try:
                    w.add_metadata(key, value, typ)
                except ValueError as e:   # what the format cannot store (SPEC §3)
                    raise ConversionError(f"{folder}: metadata {key!r} from the checkpoint "
                                          f"cannot be stored: {e}") from None
            for name in dense:
                t = ckpt.tensors[name]
                w.add_tensor(name, t.dtype, t.shape, ckpt.raw(name), encoding=dense_encoding,
                             chunks=chunks, exp_codec=exp_codec)
                bar.update(t.nbytes)
            with ThreadPoolExecutor(threads) as pool:
                window: deque = deque()
                for (layer, e) in sorted(experts):
                    pieces = _expert_pieces(ckpt, experts[(layer, e)], e)
                    window.append(pool.submit(zmoe.encode_expert, layer, e, pieces, chunks,
                                              raw=expert_encoding == zmoe.ENC_RAW,
                                              exp_codec=exp_codec))
                    while len(window) > 2 * threads:
                        enc = window.popleft().result()
                        w.write_expert(enc)
                        bar.update(sum(memoryview(p.data).nbytes for p in enc.pieces))
                while window:
                    enc = window.popleft().result()
                    w.write_expert(enc)
                    bar.update(sum(memoryview(p.data).nbytes for p in enc.pieces))
            w.set_order(t.name for t in ckpt)  # SPEC §2: index records in the source's order
            w.close()
        except BaseException:
            w.abort()
            raise
        bar.close()
        if verify:
            verify_against(tmp, ckpt, progress)
        os.replace(tmp, output)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise write_error(output, e) from None
    finally:
        bar.close()
        ckpt.close()
        if tmp.exists():
            tmp.unlink()
    return output

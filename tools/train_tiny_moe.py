#!/usr/bin/env python3
"""Train a small Qwen3-MoE on a text corpus, for measurements that need realistic routing.

Random routers route every token almost uniformly and independently from one layer to the next,
so they say nothing about what a cache or a cross-layer prefetch gains on a real model. This tool
trains a small ``Qwen3MoeForCausalLM`` (transformers, the reference implementation) on plain-text
files and saves a Hugging Face folder that ``zipmoe-rt convert`` takes: ``config.json``,
``model.safetensors`` (BF16), ``tokenizer.json`` (a byte-level BPE trained on the same corpus with
``tokenizers``), ``tokenizer_config.json`` and ``generation_config.json``.

It needs torch, transformers and tokenizers (`pip install zipmoe-rt[train]`; never imported by
the runtime).
After training it prints, per MoE layer, on held-out text:

- the expert-load entropy in bits, and as a share of ``log2(num_experts)`` (1.0 = uniform);
- the top-k overlap between consecutive tokens (``|topk(t) ∩ topk(t-1)| / k``; ``k / E`` when
  routing is independent of the previous token);
- the cross-layer prediction recall: layer l+1's router (after its ``post_attention_layernorm``)
  applied to the residual stream entering layer l's MoE block, against the experts layer l+1
  actually picks (what ``--prefetch on`` predicts at run time).

Usage::

    python tools/train_tiny_moe.py --corpus ../shared/corpora/gutenberg --out /work/trained_moe \\
        --minutes 12 --device cpu
    zipmoe-rt convert /work/trained_moe /work/trained_moe.zmoe

Default corpus: ``../shared/corpora/gutenberg`` relative to the repository root when it exists;
otherwise the tool stops and says that a corpus must be given with ``--corpus``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS_REL = Path("..") / "shared" / "corpora" / "gutenberg"


def default_corpus() -> Path | None:
    """``../shared/corpora/gutenberg`` beside the repository (its main checkout when this is a
    git worktree), or beside the working directory; None when none exists."""
    roots = [REPO, Path.cwd()]
    common = REPO / ".git"
    if common.is_file():  # a worktree: .git names the main checkout's git directory
        gd = Path(common.read_text().split("gitdir:", 1)[-1].strip())
        roots.append(gd.parent.parent.parent)
    for r in roots:
        if (r / CORPUS_REL).is_dir():
            return (r / CORPUS_REL).resolve()
    return None
EOS = "<|endoftext|>"


def read_corpus(path: Path) -> list[str]:
    """The texts under ``path`` (a ``.txt`` file, or a folder's ``*.txt`` files, sorted).

    Raises:
        SystemExit: naming the path when it does not exist or holds no text.
    """
    if not path.exists():
        raise SystemExit(f"train_tiny_moe: corpus {path} does not exist (give --corpus PATH)")
    files = [path] if path.is_file() else sorted(path.glob("**/*.txt"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SystemExit(f"train_tiny_moe: corpus {path} holds no non-empty .txt file")
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE of ``vocab`` tokens (``EOS`` included) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def build_config(args, vocab: int, eos_id: int):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
        moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=2048, tie_word_embeddings=False,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        # transformers' grouped GEMM over the experts: ~4x faster than its per-expert loop on
        # a CPU, same maths
        experts_implementation="grouped_mm")


def _moe_inputs(model, ids):
    """Per layer: the residual stream entering the MoE block's norm, (tokens, hidden) fp32."""
    import torch
    got: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_mod, inp, i=i):
            got[i] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(len(model.model.layers))]


def _topk(model, layer: int, h):
    import torch
    lay = model.model.layers[layer]
    with torch.no_grad():
        logits = lay.mlp.gate(lay.post_attention_layernorm(h.to(lay.mlp.gate.weight.dtype)))[0]
    return torch.topk(logits.float(), model.config.num_experts_per_tok, dim=-1).indices


def routing_stats(model, ids) -> list[dict]:
    """Per MoE layer: load entropy, consecutive-token overlap and cross-layer recall.

    Args:
        model: a ``Qwen3MoeForCausalLM``.
        ids: (batch, seq) int64 held-out token ids.
    Returns:
        one dict per layer: ``entropy_bits``, ``entropy_share`` (of log2 E), ``overlap``
        (mean share of top-k kept from the previous token), ``recall_next`` (layer l+1's
        router on layer l's MoE input; None for the last layer).
    """
    import torch
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    b, s = ids.shape
    hs = _moe_inputs(model, ids)
    sel = [_topk(model, i, h) for i, h in enumerate(hs)]
    out = []
    for i, t in enumerate(sel):
        counts = torch.bincount(t.reshape(-1), minlength=E).double()
        p = counts / counts.sum()
        ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
        tt = t.reshape(b, s, k)
        cur = torch.nn.functional.one_hot(tt[:, 1:], E).sum(2)
        prev = torch.nn.functional.one_hot(tt[:, :-1], E).sum(2)
        overlap = float((cur * prev).sum() / (b * (s - 1) * k))
        rec = None
        if i + 1 < len(sel):
            pred = torch.nn.functional.one_hot(_topk(model, i + 1, hs[i]), E).sum(1)
            act = torch.nn.functional.one_hot(sel[i + 1], E).sum(1)
            rec = float((pred * act).sum() / act.sum())
        out.append(dict(layer=i, entropy_bits=ent, entropy_share=ent / math.log2(E),
                        overlap=overlap, recall_next=rec))
    return out


def print_stats(stats: list[dict], E: int, k: int) -> None:
    print(f"routing on held-out text (uniform: entropy share 1.000, overlap {k / E:.3f}, "
          f"cross-layer recall {k / E:.3f})")
    print("layer  load entropy (bits, share)  consecutive top-k overlap  recall of l+1 from l")
    for r in stats:
        rec = "-" if r["recall_next"] is None else f"{r['recall_next']:.3f}"
        print(f"{r['layer']:5d}  {r['entropy_bits']:6.3f} ({r['entropy_share']:.3f})"
              f"{'':13s}{r['overlap']:.3f}{'':22s}{rec}")


def save(model, tok, out: Path, eos_id: int, seq: int) -> None:
    import torch
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
        "pad_token": EOS, "model_max_length": seq * 16, "clean_up_tokenization_spaces": False},
        indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": eos_id, "bos_token_id": eos_id, "pad_token_id": eos_id,
        "do_sample": False}, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=None,
                    help=f"a .txt file or a folder of them (default {CORPUS_REL} beside the "
                    "repository, if it exists)")
    ap.add_argument("--out", type=Path, required=True, help="output Hugging Face folder")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--minutes", type=float, default=12.0, help="training time limit")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; 1 is fastest on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    corpus = args.corpus or default_corpus()
    if corpus is None:
        raise SystemExit(f"train_tiny_moe: no corpus given and no {CORPUS_REL} beside the "
                         "repository or the working directory; pass --corpus PATH")
    if args.hidden % 64:
        raise SystemExit(f"train_tiny_moe: --hidden {args.hidden} must be a multiple of 64")
    if not 1 <= args.top_k <= args.experts:
        raise SystemExit(f"train_tiny_moe: --top-k {args.top_k} must be in 1..--experts")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_tiny_moe: --device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import Qwen3MoeForCausalLM

    texts = read_corpus(corpus)
    print(f"corpus {corpus}: {len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} M characters")
    tok = train_tokenizer(texts, args.vocab)
    eos_id = tok.token_to_id(EOS)
    ids = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
        ids.append(eos_id)
    data = torch.tensor(ids, dtype=torch.long)
    n_val = max(len(data) // 50, args.seq * 8 + 1)
    train, val = data[:-n_val], data[-n_val:]
    print(f"tokens: {len(train)} train, {len(val)} held out (vocab {tok.get_vocab_size()})")

    cfg = build_config(args, tok.get_vocab_size(), eos_id)
    dev = torch.device(args.device)
    model = Qwen3MoeForCausalLM(cfg).to(dev)
    n_par = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {n_par / 1e6:.1f} M parameters, {n_exp / 1e6:.1f} M in experts")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)

    def batch(src):
        starts = torch.randint(0, len(src) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([src[s:s + args.seq + 1] for s in starts.tolist()]).to(dev)
        return x[:, :-1], x[:, 1:]

    limit = args.minutes * 60.0
    t0 = time.monotonic()
    step, warm = 0, 30
    model.train()
    while step < args.max_steps and time.monotonic() - t0 < limit:
        frac = (time.monotonic() - t0) / limit
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = batch(train)
        out = model(input_ids=x, labels=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == 1:
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else float("nan")
            print(f"step {step:5d}  {time.monotonic() - t0:6.0f} s  loss {float(out.loss.detach()):.3f}"
                  f"  aux {aux:.3f}  lr {lr:.2e}", flush=True)
    model.eval()
    with torch.no_grad():
        vx = torch.stack([val[i * args.seq:(i + 1) * args.seq + 1] for i in range(8)]).to(dev)
        vl = float(model(input_ids=vx[:, :-1], labels=vx[:, 1:]).loss)
    print(f"trained {step} steps in {time.monotonic() - t0:.0f} s; held-out loss {vl:.3f} "
          f"(perplexity {math.exp(vl):.1f})")
    print_stats(routing_stats(model, vx[:, :-1]), cfg.num_experts, cfg.num_experts_per_tok)
    save(model.cpu(), tok, args.out, eos_id, args.seq)
    print(f"saved {args.out} (convert with: zipmoe-rt convert {args.out} OUT.zmoe)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

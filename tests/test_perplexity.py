"""``zipmoe-rt perplexity``: the windows of the sliding-window recipe against the recipe's
label masking, the perplexity of a tiny random model and of the default model against
transformers' loss on the same checkpoint and token ids (to 4 significant digits), the same
under a memory budget, and the errors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from zipmoe_rt.perplexity import PerplexityError, check_windows, token_nll, windows

from cli_runner import cli
from test_api import make_chat_model

DATA = Path(__file__).parent / "data"
#: ../shared/corpora/gutenberg next to the repository, when present (never required)
GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "gutenberg"
OUT_RE = re.compile(r"^(.*): ([\d,]+) tokens, ctx (\d+), stride (\d+), (\d+) windows?\n"
                    r"tokens scored ([\d,]+)\nmean NLL +([\d.]+) nats/token\nPPL +([\d.]+)\n$")


def parse(r) -> dict:
    assert r.exit_code == 0, r.output
    m = OUT_RE.match(r.stdout)
    assert m, r.stdout
    g = m.groups()
    return {"tokens": int(g[1].replace(",", "")), "ctx": int(g[2]), "stride": int(g[3]),
            "windows": int(g[4]), "scored": int(g[5].replace(",", "")),
            "nll": float(g[6]), "ppl": float(g[7])}


def excerpt() -> str:
    """A few hundred tokens of English: the opening of Emma from ../shared's Gutenberg corpus
    when present, else the same passage bundled in tests/data."""
    book = GUTENBERG / "austen-emma.txt"
    if book.is_file():
        text = book.read_text(encoding="utf-8")
        start = text.index("Emma Woodhouse, handsome")
        return text[start:start + 1700]
    return (DATA / "austen-emma-ch1.txt").read_text(encoding="utf-8")


def recipe_scored(n: int, ctx: int, stride: int) -> list[list[int]]:
    """The positions each window scores, from transformers' recipe as written: labels are the
    window's ids with all but the last ``end - prev_end`` set to -100, and the model's loss
    shifts them by one (position 0 of a window is never a label)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        masked = set(labels[:-trg_len] if trg_len < len(labels) else [])
        out.append([t for t in labels[1:] if t not in masked])
        prev_end = end
        if end == n:
            break
    return out


def hf_perplexity(folder, ids, ctx: int, stride: int) -> tuple[float, int]:
    """(mean NLL, tokens scored) from transformers (float32, eager) on ``ids``: the recipe's
    windows and labels, each window's loss weighted by the labels it averaged over."""
    import torch
    from tiny_models import load_hf

    hf = load_hf(folder)
    ids_t = torch.tensor(np.asarray(ids, np.int64))[None]
    total, count, prev_end = 0.0, 0, 0
    n = ids_t.shape[1]
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        trg_len = end - prev_end
        x = ids_t[:, begin:end]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        total += float(loss) * k
        count += k
        prev_end = end
        if end == n:
            break
    return total / count, count


def agree4(a: float, b: float) -> bool:
    """a and b agree to 4 significant digits (relative difference below 5e-5)."""
    return abs(a - b) <= 5e-5 * abs(b)


# -- windows -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 2), (10, 4, 4), (10, 4, 3), (3, 8, 4),
                                           (2, 2, 1), (17, 5, 1), (16, 8, 8), (100, 16, 7)])
def test_windows_score_what_the_recipe_scores(n, ctx, stride):
    wins = windows(n, ctx, stride)
    assert [list(range(first, end)) for _, end, first in wins] == recipe_scored(n, ctx, stride)
    assert all(end - begin <= ctx and begin % stride == 0 for begin, end, _ in wins)
    scored = [t for _, end, first in wins for t in range(first, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    if stride < ctx:        # every token but the first, once
        assert sorted(scored) == list(range(1, n))


def test_windows_examples():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # stride == ctx: the first token of each window has no context in it and is not scored
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def test_token_nll_is_cross_entropy():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((5, 11)) * 30).astype(np.float32)
    t = rng.integers(0, 11, 5)
    p = np.exp(z.astype(np.float64) - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(token_nll(z, t), -np.log(p[np.arange(5), t]), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("n,ctx,stride,msg", [
    (10, 0, 1, "--ctx must be a positive number"),
    (10, 4, 0, "--stride must be a positive number"),
    (10, 4, -2, "--stride must be a positive number"),
    (10, 1, 1, "--ctx must be at least 2"),
    (10, 4, 5, "--stride 5 is larger than --ctx 4"),
    (1, 4, 2, "1 token; at least 2 are needed"),
    (0, 4, 2, "0 tokens; at least 2 are needed"),
])
def test_check_windows_errors(n, ctx, stride, msg):
    with pytest.raises(PerplexityError, match=re.escape(msg)):
        check_windows(n, ctx, stride, 512)
    with pytest.raises(PerplexityError, match="longer than the model's context length"):
        check_windows(10, 513, 2, 512)


# -- a tiny random model against transformers ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat(tiny_moe_dir, tmp_path_factory):
    """Factory: spec name -> (HF folder, .zmoe with a tokenizer)."""
    made = {}

    def get(name):
        if name not in made:
            src = tiny_moe_dir(name)
            made[name] = src, make_chat_model(src, tmp_path_factory.mktemp("ppl") / name)
        return made[name]
    return get


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "emma.txt"
    p.write_text(excerpt(), encoding="utf-8")
    return p


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_tiny_matches_transformers(tiny_chat, text_file, name):
    import zipmoe_rt
    src, zm = tiny_chat(name)
    with zipmoe_rt.load(zm) as m:
        ids = m.tokenizer.encode(text_file.read_text(encoding="utf-8"), add_special_tokens=True)
    ctx, stride = 48, 20            # overlapping windows
    got = parse(cli("perplexity", zm, text_file, "--ctx", ctx, "--stride", stride, "-q"))
    nll, scored = hf_perplexity(src, ids, ctx, stride)
    assert got["tokens"] == len(ids) > 3 * ctx
    assert got["scored"] == scored == len(ids) - 1
    assert got["windows"] == len(windows(len(ids), ctx, stride))
    assert agree4(got["nll"], nll) and agree4(got["ppl"], math.exp(nll)), (got, nll)


def test_tiny_same_under_a_memory_budget(tiny_chat, text_file, tmp_path):
    """Every policy gives the unbudgeted output: zip-lru, zipmoe (a trace recorded first) and
    raw-lru (a file with raw experts)."""
    import shutil

    from zipmoe_rt.convert.converter import convert
    _, zm = tiny_chat("mixtral")
    own = tmp_path / "m.zmoe"                 # the trace and calibration land next to it
    shutil.copy(zm, own)
    raw = convert(zm.with_suffix(""), tmp_path / "raw.zmoe", expert_encoding="raw",
                  progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat sat on the mat\n")
    assert cli("profile", own, "--prompts", prompts, "-n", 4, "--raw", "-q").exit_code == 0
    win = ("--ctx", 40, "--stride", 40, "-q")
    plain = cli("perplexity", own, text_file, *win)
    for model, policy in ((own, "zip-lru"), (own, "zipmoe"), (raw, "raw-lru")):
        budgeted = cli("perplexity", model, text_file, *win, "--memory-budget", "40%",
                       "--policy", policy)
        assert budgeted.stdout.split("\n", 1)[1] == plain.stdout.split("\n", 1)[1], policy
    r = parse(plain)
    assert r["scored"] == r["tokens"] - r["windows"]   # stride == ctx: window starts unscored


def test_default_stride_is_half_the_window(tiny_chat, text_file):
    _, zm = tiny_chat("mixtral")
    r = parse(cli("perplexity", zm, text_file, "--ctx", 64, "-q"))
    assert (r["ctx"], r["stride"]) == (64, 32)
    r = parse(cli("perplexity", zm, text_file, "-q"))
    assert (r["ctx"], r["stride"]) == (512, 256)         # the tiny model's context is 512


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_chat, text_file, monkeypatch):
    """The progress bar is drawn on a terminal only (as every progress bar of the CLI): here
    stderr is captured, so without ``-q`` it stays empty; with a terminal it shows."""
    _, zm = tiny_chat("mixtral")
    plain = cli("perplexity", zm, text_file, "--ctx", 64)
    assert plain.stderr == ""
    assert plain.stdout == cli("perplexity", zm, text_file, "--ctx", 64, "-q").stdout
    import zipmoe_rt.cli_eval as E
    monkeypatch.setattr(E, "progress_wanted", lambda quiet=False: not quiet)   # a terminal
    assert "perplexity:" in cli("perplexity", zm, text_file, "--ctx", 64).stderr


@pytest.mark.parametrize("args,needles", [
    (("--ctx", 8, "--stride", 9), ("--stride 9 is larger than --ctx 8",)),
    (("--ctx", 0), ("--ctx must be a positive number",)),
    (("--ctx", 16, "--stride", 0), ("--stride must be a positive number",)),
    (("--ctx", 513), ("--ctx 513 is longer than the model's context length "
                      "(max_position_embeddings 512)",)),
])
def test_bad_windows_are_one_line_errors(tiny_chat, text_file, args, needles):
    _, zm = tiny_chat("mixtral")
    r = cli("perplexity", zm, text_file, *args, "-q")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert all(n in r.stderr for n in needles), r.stderr


@pytest.mark.parametrize("content,needle", [
    (b"", "0 tokens; at least 2 are needed"),
    (b"a", "1 token; at least 2 are needed"),
    (b"\xff\xfe bad", "not UTF-8 text"),
    (None, "no such file"),
])
def test_bad_text_files_are_one_line_errors(tiny_chat, tmp_path, content, needle):
    _, zm = tiny_chat("mixtral")
    f = tmp_path / "t.txt"
    if content is not None:
        f.write_bytes(content)
    r = cli("perplexity", zm, f, "--ctx", 16, "-q")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and needle in r.stderr and str(f) in r.stderr, r.stderr


# -- the default model ------------------------------------------------------------------------
def test_default_model_matches_transformers(default_hf_dir, default_zmoe, tmp_path):
    """SmolLM2-MoE (the default model) on a few hundred tokens of Emma, overlapping windows."""
    import zipmoe_rt
    f = tmp_path / "emma.txt"
    f.write_text(excerpt(), encoding="utf-8")
    with zipmoe_rt.load(default_zmoe) as m:
        ids = m.tokenizer.encode(f.read_text(encoding="utf-8"), add_special_tokens=True)
    assert 200 <= len(ids) <= 1000
    ctx, stride = 128, 48
    got = parse(cli("perplexity", default_zmoe, f, "--ctx", ctx, "--stride", stride, "-q"))
    nll, scored = hf_perplexity(default_hf_dir, ids, ctx, stride)
    assert got["tokens"] == len(ids) and got["scored"] == scored == len(ids) - 1
    assert agree4(got["nll"], nll) and agree4(got["ppl"], math.exp(nll)), (got, nll)
    assert 5 < got["ppl"] < 100        # a trained model on English prose


def test_text_from_a_pipe_and_a_folder(tiny_chat, tmp_path, text_file):
    """The text may come from a pipe (``/dev/stdin``, ``<(...)``): the same figures as from the
    file (it used to be refused as "no such file"); a folder is named as such."""
    import os
    import threading

    _, zm = tiny_chat("mixtral")
    want = cli("perplexity", zm, text_file, "--ctx", 16, "-q")
    assert want.exit_code == 0, want.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = Path(text_file).read_bytes()
    th = threading.Thread(target=fifo.write_bytes, args=(data,), daemon=True)
    th.start()
    got = cli("perplexity", zm, fifo, "--ctx", 16, "-q")
    if th.is_alive():       # the pipe was never read: open it so the writer does not hang
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        th.join(5)
        os.close(fd)
    th.join(5)
    assert got.exit_code == 0, got.stderr
    assert got.stdout.replace(str(fifo), "F") == want.stdout.replace(str(text_file), "F")
    r = cli("perplexity", zm, tmp_path, "--ctx", 16, "-q")
    assert r.exit_code == 1
    assert r.stderr == f"error: {tmp_path}: is a folder; give a UTF-8 text file\n"
    r = cli("perplexity", zm, "/dev/zero", "--ctx", 16, "-q")      # endless: never read
    assert r.exit_code == 1 and r.stderr == "error: /dev/zero: not a regular file or a pipe\n"

"""The ``zipmoe-rt`` command line: every verb, its errors, and that ``run``/``chat`` print exactly
what the Python API returns. Mostly in-process (click's CliRunner); the REPL runs under a real
pseudo-terminal. Models: the tiny random Mixtral with a test-time tokenizer (test_api.py), and the
bundled default model for one end-to-end check."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zmoe
import zipmoe_rt
from zipmoe_rt.cli import main
from zipmoe_rt.engine.tiers import size_text

from cli_pty import cli_argv, driving
from cli_runner import cli
from test_api import make_chat_model  # the tiny model + tokenizer builder shared with the API tests

STATS_RE = re.compile(r"^\[(\d+) prompt \+ (\d+) cached tokens, (\d+) generated \((\w+)\); "
                      r"TTFT [\d.]+ s, prefill [\d.]+ tokens/s, decode [\d.]+ tokens/s\]$")


@pytest.fixture(scope="module")
def tiny_src(tiny_moe_dir) -> Path:
    return tiny_moe_dir("mixtral")


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_src, tmp_path_factory) -> Path:
    # its generation_config.json asks for greedy decoding, so the CLI's default output is the
    # API's greedy text (test_cli_repl.py covers a model that asks for sampling)
    return make_chat_model(tiny_src, tmp_path_factory.mktemp("cli") / "tiny-chat",
                           generation_config={"do_sample": False})


@pytest.fixture(scope="module")
def model(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    yield m
    m.close()


def assert_one_line_error(r, *needles):
    """Exit status 1, nothing but one ``error: ...`` line on stderr, no traceback."""
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def stats_of(stderr: str):
    """The parsed stats line: (prompt, cached, generated, finish_reason)."""
    found = [STATS_RE.match(l) for l in stderr.splitlines()]
    found = [m for m in found if m]
    assert len(found) == 1, stderr
    p, c, g, why = found[0].groups()
    return int(p), int(c), int(g), why


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb, says", [
    (None, "run Mixture-of-Experts models losslessly"),
    ("convert", "Convert a Hugging Face MoE checkpoint folder to .zmoe"),
    ("export", "Write a .zmoe back as a Hugging Face folder"),
    ("verify", "Check every checksum of a .zmoe file"),
    ("inspect", "Print a .zmoe's metadata, tensor table and bits per weight"),
    ("run", "One-shot generation: the completion goes to stdout, timings to stderr"),
    ("chat", "Interactive chat REPL"),
])
def test_help_says_what_each_verb_does(verb, says):
    for flag in ("--help", "-h"):
        r = cli(*([verb] if verb else []), flag)
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith("Usage: zipmoe-rt"), r.stdout
        assert says in " ".join(r.stdout.split()), r.stdout


@pytest.mark.parametrize("verb", sorted(main.commands))
def test_every_verb_has_help(verb):
    """Every registered verb (new ones included): --help exits 0 and shows its docstring."""
    cmd = main.commands[verb]
    assert cmd.help and cmd.help.strip(), f"{verb} has no help text"
    r = cli(verb, "--help")
    assert r.exit_code == 0, r.output
    first = " ".join(cmd.help.strip().splitlines()[0].split())
    assert first in " ".join(r.stdout.split())


@pytest.mark.parametrize("verb", ["run", "chat"])
def test_help_shows_the_ranges_that_are_accepted(verb):
    """-n takes -1 or >= 1 (not "[x<=None]"); --temp shows no float32 bound in its range."""
    import re
    r = cli(verb, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    n = re.search(r"-n, --max-tokens INTEGER (.*?) --temperature", text).group(1)
    assert n.endswith("[x>=1 or x=-1]"), n
    temp = re.search(r"--temperature, --temp NUMBER (.*?) --top-k", text).group(1)
    assert temp.endswith("[x>=0.0]"), temp
    assert "None" not in text and "e+38" not in text, text
    # what is accepted is as before
    assert cli(verb, "--temp", "1e39").stderr.startswith(
        "error: Invalid value for '--temperature' / '--temp': '1e39' is more than 3.40282e+38")


def test_unknown_verb_is_one_line():
    assert_one_line_error(cli("frobnicate"), "frobnicate")


def test_top_level_help_lists_every_verb_with_a_summary():
    out = cli("--help").stdout
    for verb in main.commands:
        line = next(l for l in out.splitlines() if l.strip().startswith(verb + " "))
        assert len(line.split()) > 2, f"no summary for {verb}: {line!r}"


def test_version():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"zipmoe-rt, version {zipmoe_rt.__version__}"


# -- convert --------------------------------------------------------------------------------------
def _bits_per_weight(path, expert: bool) -> float:
    with zmoe.ZmoeReader(path) as r:
        names = [n for n, t in r.tensors.items() if ("expert" in t) == expert]
        stored = sum(r.stored_bytes(n) for n in names)
        n = sum(zmoe.reader.element_count(r.tensors[x]) for x in names)
    return 8 * stored / n


def test_convert_prints_bits_per_weight(tiny_zmoe, tmp_path):
    src = tiny_zmoe.with_suffix("")
    out = tmp_path / "m.zmoe"
    r = cli("convert", src, "-o", out, "-q", "--chunks", 2, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert out.is_file() and not list(tmp_path.glob("*.tmp-*"))
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{out}: .zmoe v{zmoe.VERSION}")
    got = {}
    for l in lines[1:]:
        m = re.match(r"^\s+(expert|dense)\s+.*?([\d.]+) bits/weight", l)
        assert m, l
        got[m.group(1)] = float(m.group(2))
    assert got["expert"] == pytest.approx(_bits_per_weight(out, True), abs=0.006)
    assert got["dense"] == pytest.approx(16.0)
    assert 8 < got["expert"] < 16  # the exponent plane compresses
    # the file converts back to the same tensors as the fixture's (default --chunks 4) file
    with zmoe.ZmoeReader(out) as a, zmoe.ZmoeReader(tiny_zmoe) as b:
        assert list(a.tensors) == list(b.tensors)
        for name in a.tensors:
            assert np.array_equal(a.read_tensor(name), b.read_tensor(name)), name


def test_convert_refuses_to_overwrite_without_force(tiny_zmoe, tmp_path):
    out = tmp_path / "m.zmoe"
    out.write_bytes(b"keep me")
    r = cli("convert", tiny_zmoe.with_suffix(""), "-o", out, "-q")
    assert_one_line_error(r, out, "--force")
    assert out.read_bytes() == b"keep me"
    r = cli("convert", tiny_zmoe.with_suffix(""), "-o", out, "-q", "--force")
    assert r.exit_code == 0 and zmoe.ZmoeReader(out).tensors


def test_convert_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    r = cli("convert", missing, "-o", tmp_path / "x.zmoe", "-q")
    assert_one_line_error(r, missing)
    assert list(tmp_path.iterdir()) == []


def test_convert_unsupported_architecture(tiny_src, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", folder, "-o", tmp_path / "x.zmoe", "-q")
    assert_one_line_error(r, "LlamaForCausalLM")
    assert not (tmp_path / "x.zmoe").exists() and not list(tmp_path.glob("x.zmoe*"))


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_convert_bad_chunks(tiny_src, tmp_path, value):
    r = cli("convert", tiny_src, "-o", tmp_path / "x.zmoe", "-q", "--chunks", value)
    assert_one_line_error(r, "--chunks", value)
    assert list(tmp_path.iterdir()) == []


# -- inspect / verify / export -------------------------------------------------------------------
def test_inspect(tiny_zmoe):
    r = cli("inspect", tiny_zmoe)
    assert r.exit_code == 0, r.output
    with zmoe.ZmoeReader(tiny_zmoe) as rd:
        names = list(rd.tensors)
    assert re.search(r"general\.architecture\s+str\s+MixtralForCausalLM", r.stdout)
    for name in names:
        assert re.search(rf"^\s+{re.escape(name)}\s", r.stdout, re.M), name
    assert re.search(r"^\s+expert\s.*bits/weight.*\(exponents: huffman\)$", r.stdout, re.M)
    r2 = cli("inspect", tiny_zmoe, "--no-tensors")
    assert r2.exit_code == 0
    assert not any(re.search(rf"^\s+{re.escape(n)}\s", r2.stdout, re.M) for n in names)
    assert "bits/weight" in r2.stdout and "general.architecture" in r2.stdout


def test_verify_good_file(tiny_zmoe):
    r = cli("verify", tiny_zmoe, "-q")
    assert r.exit_code == 0, r.output
    with zmoe.ZmoeReader(tiny_zmoe) as rd:
        n = len(rd.tensors)
    assert r.stdout.strip() == (f"{tiny_zmoe}: OK ({n} tensors, 12 expert blocks, all checksums "
                                f"match; tokenizer and chat template load)")


def _flip_expert_exponent_byte(src: Path, dest: Path, layer: int = 1, expert: int = 2):
    """Copy ``src`` to ``dest`` with one byte flipped inside an exponent chunk of one expert
    tensor; return that tensor's name."""
    shutil.copy(src, dest)
    with zmoe.ZmoeReader(src) as r:
        name = next(n for n in r.experts[(layer, expert)]["tensors"])
        t = r.tensors[name]
        part = t["parts"][expert] if t["expert"].get("stacked") else t["parts"][0]
        off, size = part["exp"][0][0], part["exp"][0][1]
    with open(dest, "r+b") as f:
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    return name


def test_verify_corrupted_exponent_chunk(tiny_zmoe, tmp_path):
    bad = tmp_path / "bad.zmoe"
    name = _flip_expert_exponent_byte(tiny_zmoe, bad)
    r = cli("verify", bad, "-q")
    line = assert_one_line_error(r, bad, repr(name), "exponent chunk", "CRC-32")
    assert "OK" not in r.stdout, line


@pytest.mark.parametrize("command", ["verify", "inspect", "run"])
def test_missing_model_file_is_one_line(tmp_path, command):
    p = tmp_path / "nope.zmoe"
    extra = ["-p", "hi"] if command == "run" else []
    line = assert_one_line_error(cli(command, p, *extra), p, "no such file")
    assert "Errno" not in line


def test_verify_not_a_zmoe(tmp_path):
    p = tmp_path / "x.zmoe"
    p.write_bytes(b"GGUF" + bytes(100))
    assert_one_line_error(cli("verify", p), p, "not a .zmoe file")


def test_export_round_trips_to_the_source(tiny_zmoe, tmp_path):
    from zipmoe_rt.convert.safetensors_io import Checkpoint

    src = tiny_zmoe.with_suffix("")
    out = tmp_path / "exported"
    r = cli("export", tiny_zmoe, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"wrote {out}"
    a, b = Checkpoint(src), Checkpoint(out)
    try:
        assert list(a.tensors) and set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert (a.tensors[name].dtype, a.tensors[name].shape) == \
                (b.tensors[name].dtype, b.tensors[name].shape), name
            assert np.array_equal(a.raw(name), b.raw(name)), name
    finally:
        a.close()
        b.close()
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((src / "config.json").read_text())
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text()) == \
        json.loads((src / "tokenizer_config.json").read_text())
    # exporting into a non-empty folder is refused and changes nothing
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(cli("export", tiny_zmoe, "-o", out, "-q"), out, "not empty")
    assert sorted(p.name for p in out.iterdir()) == before


# -- run ----------------------------------------------------------------------------------------------
def test_run_prints_only_the_completion(model, tiny_zmoe):
    prompt = "what is the capital of france"
    r = cli("run", tiny_zmoe, "-p", prompt, "-n", 12)
    assert r.exit_code == 0, r.output
    want = model.chat([user(prompt)], max_tokens=12)
    assert r.stdout == want + "\n"
    assert prompt not in r.stdout and "TTFT" not in r.stdout
    p, c, g, why = stats_of(r.stderr)
    assert (p, c, g, why) == (len(model.tokenizer.encode_chat([user(prompt)])), 0, 12, "length")
    assert len(r.stderr.splitlines()) == 1


def test_run_system_and_raw(model, tiny_zmoe):
    r = cli("run", tiny_zmoe, "-p", "hello world", "--system", "be brief", "-n", 9)
    assert r.stdout == model.chat([{"role": "system", "content": "be brief"}, user("hello world")],
                                  max_tokens=9) + "\n"
    r = cli("run", tiny_zmoe, "-p", "the quick brown fox", "--raw", "-n", 9)
    assert r.exit_code == 0
    assert r.stdout == model.generate("the quick brown fox", max_tokens=9) + "\n"
    assert stats_of(r.stderr)[0] == len(model.tokenizer.encode("the quick brown fox"))


def test_run_prompt_from_stdin(model, tiny_zmoe):
    a = cli("run", tiny_zmoe, "-p", "-", "-n", 10, input="tell me a story")
    b = cli("run", tiny_zmoe, "-p", "tell me a story", "-n", 10)
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert a.stdout == model.chat([user("tell me a story")], max_tokens=10) + "\n"
    raw = cli("run", tiny_zmoe, "-p", "-", "--raw", "-n", 10, input="once upon")
    assert raw.stdout == model.generate("once upon", max_tokens=10) + "\n"


def test_run_greedy_is_deterministic_and_sampling_follows_the_seed(model, tiny_zmoe):
    g1 = cli("run", tiny_zmoe, "-p", "hello", "-n", 16, "--temperature", 0)
    g2 = cli("run", tiny_zmoe, "-p", "hello", "-n", 16)
    assert g1.stdout == g2.stdout == model.chat([user("hello")], max_tokens=16) + "\n"
    s1 = cli("run", tiny_zmoe, "-p", "hello", "-n", 16, "--temperature", 0.8, "--seed", 1)
    s2 = cli("run", tiny_zmoe, "-p", "hello", "-n", 16, "--temperature", 0.8, "--seed", 1)
    s3 = cli("run", tiny_zmoe, "-p", "hello", "-n", 16, "--temperature", 0.8, "--seed", 2)
    assert s1.stdout == s2.stdout == model.chat([user("hello")], max_tokens=16, temperature=0.8,
                                                seed=1) + "\n"
    assert s3.stdout != s1.stdout
    k = cli("run", tiny_zmoe, "-p", "hello", "-n", 16, "--temp", 1.2, "--top-k", 5, "--top-p", 0.9,
            "--min-p", 0.05, "--repeat-penalty", 1.3, "--seed", 4)
    assert k.stdout == model.chat([user("hello")], max_tokens=16, temperature=1.2, top_k=5,
                                  top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=4) + "\n"


def test_run_single_token(model, tiny_zmoe):
    # one generated token: no decode phase, so decode speed is undefined; must still print stats
    r = cli("run", tiny_zmoe, "-p", "hello", "-n", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout == model.chat([user("hello")], max_tokens=1) + "\n"
    assert "1 generated (length)" in r.stderr and not r.stderr.startswith("error")


def test_run_under_a_memory_budget_gives_the_same_text(model, tiny_zmoe):
    want = model.chat([user("hello")], max_tokens=12) + "\n"
    r = cli("run", tiny_zmoe, "-p", "hello", "-n", 12, "--memory-budget", "30%")
    assert r.exit_code == 0, r.output
    assert r.stdout == want
    # the budget is stated on stderr, as with --memory-limit
    with zipmoe_rt.load(tiny_zmoe, memory_budget="30%") as m:
        on = "on" if m.engine.prefetch else "off"
        line = (f"zipmoe-rt: no memory limit; weight budget {size_text(m.engine.budget)}; "
                f"prefetch {on}; policy ")
    assert r.stderr.splitlines()[0].startswith(line), r.stderr
    assert_one_line_error(cli("run", tiny_zmoe, "-p", "hello", "-m", "lots"), "--memory-budget",
                          "lots")


@pytest.mark.parametrize("opt, value", [("--temperature", "-1"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--top-k", "-1"), ("-n", "0"),
                                        ("--repeat-penalty", "0")])
def test_run_bad_sampling_option(tiny_zmoe, opt, value):
    assert_one_line_error(cli("run", tiny_zmoe, "-p", "hi", opt, value), opt, value)


def test_run_missing_prompt(tiny_zmoe):
    assert_one_line_error(cli("run", tiny_zmoe), "--prompt")


def test_run_bad_model_paths(tiny_src, tmp_path):
    missing = tmp_path / "nope.zmoe"
    assert_one_line_error(cli("run", missing, "-p", "hi"), missing, "no such file")
    assert_one_line_error(cli("chat", missing, input="hi\n"), missing, "no such file")
    # a Hugging Face folder: the hint says to convert it
    assert_one_line_error(cli("run", tiny_src, "-p", "hi"), tiny_src, "zipmoe-rt convert")
    notz = tmp_path / "weights.safetensors"
    shutil.copy(tiny_src / "model.safetensors", notz)
    assert_one_line_error(cli("run", notz, "-p", "hi"), notz, "not a .zmoe file")


def test_run_truncated_file(tiny_zmoe, tmp_path):
    bad = tmp_path / "short.zmoe"
    data = tiny_zmoe.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for args in (["run", bad, "-p", "hi"], ["chat", bad], ["inspect", bad], ["verify", bad],
                 ["export", bad, "-o", tmp_path / "out"]):
        assert_one_line_error(cli(*args, input="hi\n"), bad, "truncated")
    assert not (tmp_path / "out").exists()


def _flip_layer0(src, dst, which):
    """Copy ``src`` to ``dst`` with one bit flipped in the middle of the first exponent chunk
    (``which="exp"``) or of the SM plane (``"sm"``) of the first tensor of every layer-0 expert."""
    shutil.copy(src, dst)
    with zmoe.ZmoeReader(src) as r:
        spans = []
        for (layer, e), block in r.experts.items():
            if layer == 0:
                t = r.tensors[block["tensors"][0]]
                part = t["parts"][e] if t["expert"].get("stacked") else t["parts"][0]
                spans.append(part["exp"][0][:2] if which == "exp" else part["sm"][:2])
    with open(dst, "r+b") as f:
        for off, size in spans:
            f.seek(off + size // 2)
            b = f.read(1)
            f.seek(off + size // 2)
            f.write(bytes([b[0] ^ 0x01]))


def test_run_corrupt_experts(tiny_zmoe, tmp_path):
    # corrupt every expert of layer 0: the first one used fails its CRC
    bad = tmp_path / "flipped.zmoe"
    _flip_layer0(tiny_zmoe, bad, "exp")
    r = cli("run", bad, "-p", "hello", "-n", 5)
    assert_one_line_error(r, bad, "CRC-32")
    # --no-verify skips the CRCs; a Huffman stream whose bits no longer add up is still caught
    # by its exact-length rule (SPEC §5.3), otherwise the run completes: never a traceback
    r = cli("run", bad, "-p", "hello", "-n", 5, "--no-verify")
    if r.exit_code:
        assert_one_line_error(r, bad, "does not decode")
    else:
        assert stats_of(r.stderr)[2:] == (5, "length")
    # a flipped sign/mantissa bit is caught only by the CRC; --no-verify runs on it
    bad_sm = tmp_path / "flipped-sm.zmoe"
    _flip_layer0(tiny_zmoe, bad_sm, "sm")
    assert_one_line_error(cli("run", bad_sm, "-p", "hello", "-n", 5), bad_sm, "CRC-32")
    r = cli("run", bad_sm, "-p", "hello", "-n", 5, "--no-verify")
    assert r.exit_code == 0 and stats_of(r.stderr)[2:] == (5, "length"), r.stderr


# -- chat (scripted) ------------------------------------------------------------------------------
def test_chat_piped_one_reply_per_line(model, tiny_zmoe):
    r = cli("chat", tiny_zmoe, "-n", 6, input="hello world\n\nwhat is the capital of france\n")
    assert r.exit_code == 0, r.output
    a1 = model.chat([user("hello world")], max_tokens=6)
    a2 = model.chat([user("hello world"), assistant(a1), user("what is the capital of france")],
                    max_tokens=6)
    assert r.stdout.splitlines() == [a1, a2]
    assert "TTFT" not in r.stdout


def test_chat_piped_commands(model, tiny_zmoe):
    script = ("hello world\n"
              "/stats\n"
              "/reset\n"
              "/stats\n"
              "tell me a story\n"
              "/system be brief\n"
              "tell me a story\n"
              "/bogus\n"
              "again please\n"
              "/stats\n"
              "/quit\n"
              "never answered\n")
    r = cli("chat", tiny_zmoe, "-n", 5, input=script)
    assert r.exit_code == 0, r.output
    sysm = {"role": "system", "content": "be brief"}
    a1 = model.chat([user("hello world")], max_tokens=5)
    a2 = model.chat([user("tell me a story")], max_tokens=5)
    a3 = model.chat([sysm, user("tell me a story")], max_tokens=5)
    conv = [sysm, user("tell me a story"), assistant(a3), user("again please")]
    a4 = model.chat(conv, max_tokens=5)
    assert r.stdout.splitlines() == [a1, a2, a3, a4]
    err = r.stderr
    assert "(conversation cleared; no system prompt)" in err
    assert "(system prompt set; conversation cleared)" in err
    assert "unknown command /bogus" in err
    # /stats right after /reset: no reply timings from before the reset, an empty KV cache
    after_reset = err.split("(conversation cleared; no system prompt)", 1)[1]
    assert after_reset.lstrip().startswith("(no reply in this conversation yet)\n"
                                           "conversation: 0 messages, 0 tokens in the KV cache")
    # /stats after the first reply, then after the last: stats line, conversation, memory
    stats = [STATS_RE.match(l) for l in err.splitlines()]
    stats = [m.groups() for m in stats if m]
    p1 = len(model.tokenizer.encode_chat([user("hello world")]))
    assert stats[0] == (str(p1), "0", "5", "length")
    conv_lines = re.findall(r"^conversation: (\d+) messages, (\d+) tokens in the KV cache$", err, re.M)
    # the KV cache holds the prompt and every generated token but the last (sampled, not fed)
    assert conv_lines[0] == ("2", str(p1 + 5 - 1))
    p4, c4 = int(stats[1][0]), int(stats[1][1])
    assert p4 + c4 == len(model.tokenizer.encode_chat(conv)) and c4 > 0
    assert conv_lines[2] == ("4", str(p4 + c4 + 5 - 1))
    mem = re.findall(r"^memory: dense ([\d.]+) MB, experts ([\d.]+) MB$", err, re.M)
    assert len(mem) == 3
    assert float(mem[0][0]) == pytest.approx(model.source.dense_bytes() / 1e6, abs=0.05)
    assert float(mem[0][0]) > 0 and float(mem[1][1]) > 0


def test_chat_ctrl_c_during_prefill_cancels_the_turn(model, tiny_zmoe, monkeypatch):
    """Ctrl-C before the first reply token (the second turn's prompt being prefilled): one
    notice line, the turn is not in the conversation (/stats), and the next turn's reply is
    that of a conversation that never had it."""
    import zipmoe_rt.api as api
    from zipmoe_rt.cli_repl import CANCELLED_TURN

    real_load = api.load

    def load(*a, **kw):
        m = real_load(*a, **kw)
        forward = m.net.forward
        calls = []

        def interrupted_once(*fa, **fkw):
            calls.append(len(fa[0]))
            if len(calls) == 6:   # the second prefill (after two warm-up forwards, the
                raise KeyboardInterrupt          # first turn's prefill and its 2 decode steps)
            return forward(*fa, **fkw)
        m.net.forward = interrupted_once
        return m

    monkeypatch.setattr(api, "load", load)
    r = cli("chat", tiny_zmoe, "-n", 3,
            input="hello world\nplease tell me a long story\n/stats\nwhat is the capital\n/stats\n")
    assert r.exit_code == 0, r.output
    a1 = model.chat([user("hello world")], max_tokens=3)
    a2 = model.chat([user("hello world"), assistant(a1), user("what is the capital")],
                    max_tokens=3)
    assert r.stdout.splitlines() == [a1, a2]
    err = r.stderr.splitlines()
    assert err.count(CANCELLED_TURN) == 1
    fresh = model.chat_session()
    assert "".join(fresh.send("hello world", max_tokens=3)) == a1
    assert err[err.index(CANCELLED_TURN) + 2] == \
        f"conversation: 2 messages, {len(fresh.state.token_ids)} tokens in the KV cache"
    assert "conversation: 4 messages" in r.stderr
    assert "0 generated (cancelled); TTFT - s, prefill - tokens/s, decode - tokens/s]" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_stats_before_any_reply(tiny_zmoe):
    r = cli("chat", tiny_zmoe, input="/stats\n")
    assert r.exit_code == 0 and r.stdout == ""
    assert "(no reply in this conversation yet)" in r.stderr
    assert "conversation: 0 messages, 0 tokens in the KV cache" in r.stderr


# -- chat REPL under a pseudo-terminal ----------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_repl_streams_survives_ctrl_c_and_quits(tiny_zmoe):
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    env.update(TERM="dumb", PYTHONUNBUFFERED="1")
    # the tiny random model never stops on its own: with -n this large a reply runs until Ctrl-C
    argv = cli_argv() + ["chat", str(tiny_zmoe), "-n", "1000000", "-c", "1000000"]
    with driving(argv, env) as proc:
        proc.expect(rb"zipmoe-rt chat: tiny-chat \(MixtralForCausalLM, 4 experts, top-2\)")
        proc.expect(rb">>> ")
        proc.send(b"hello world\r")
        proc.expect(rb"hello world\r?\n")          # the terminal's echo of the line
        streamed = proc.read_at_least(400)         # a reply arriving while it is generated
        assert b">>> " not in streamed and b"[stopped]" not in streamed
        proc.send(b"\x03")                         # Ctrl-C: SIGINT to the foreground group
        proc.expect(rb" \[stopped\]\r?\n")
        proc.expect(rb"\[\d+ prompt \+ 0 cached tokens, \d+ generated \(stopped\)")
        proc.expect(rb">>> ")
        proc.send(b"/stats\r")
        proc.expect(rb"conversation: 2 messages, \d+ tokens in the KV cache")
        proc.expect(rb">>> ")
        # the next turn works and continues the conversation (the KV cache is reused)
        proc.send(b"tell me a story\r")
        proc.expect(rb"tell me a story\r?\n")
        proc.read_at_least(400)
        proc.send(b"\x03")
        proc.expect(rb" \[stopped\]\r?\n")
        m = proc.expect(rb"\[\d+ prompt \+ (\d+) cached tokens, \d+ generated \(stopped\)")
        assert int(m.group(1)) > 0
        proc.expect(rb">>> ")
        proc.send(b"/stats\r")
        proc.expect(rb"conversation: 4 messages")
        proc.expect(rb">>> ")
        # Ctrl-C at the prompt does not leave
        if proc.blocked_reading():
            proc.send(b"\x03")
            proc.expect(rb"\(use /quit or Ctrl-D to leave\)")
            proc.expect(rb">>> ")
        proc.send(b"/quit\r")
        assert proc.wait() == 0


# -- the bundled default model, end to end ------------------------------------------------------------
_API_REPLIES = """
import json, sys, zipmoe_rt
q = sys.argv[2]
with zipmoe_rt.load(sys.argv[1]) as m:
    want = m.chat([{"role": "user", "content": q}], max_tokens=40)
    st = m.last_stats
    follow = m.chat([{"role": "user", "content": q}, {"role": "assistant", "content": want},
                     {"role": "user", "content": "And of Italy?"}], max_tokens=40)
print(json.dumps({"want": want, "follow": follow, "prompt": st.prompt_tokens,
                  "output": st.output_tokens, "generated": st.generated_tokens,
                  "finish": st.finish_reason}))
"""


def test_run_and_chat_default_model(default_zmoe):
    # Fresh processes: numba kernels run several times slower in a process that has used torch
    # (as the tiny-checkpoint fixtures do), and these are the real entry points anyway.
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    q = "What is the capital of France?"
    api = subprocess.run([sys.executable, "-c", _API_REPLIES, str(default_zmoe), q], env=env,
                         capture_output=True, text=True, check=True, timeout=900)
    ref = json.loads(api.stdout)
    assert ref["finish"] == "stop" and "Paris" in ref["want"]
    r = subprocess.run(cli_argv() + ["run", str(default_zmoe), "-p", q, "-n", "40", "--temp", "0"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref["want"] + "\n"
    # the stop token counted, as serve's usage.completion_tokens and llama.cpp's server count it
    assert stats_of(r.stderr) == (ref["prompt"], 0, ref["generated"], "stop")
    assert ref["generated"] == ref["output"] + 1
    c = subprocess.run(cli_argv() + ["chat", str(default_zmoe), "-n", "40", "--temp", "0"],
                       env=env, input=f"{q}\nAnd of Italy?\n", capture_output=True, text=True,
                       timeout=900)
    assert c.returncode == 0, c.stderr
    assert c.stdout == ref["want"] + "\n" + ref["follow"] + "\n"


def test_convert_output_naming_a_folder_is_refused(tmp_path):
    """`convert -o DIR/` (a trailing slash: the user means a folder) used to write a file named
    DIR; now one error line naming the option, and nothing is written."""
    out = tmp_path / "models"
    r = cli("convert", tmp_path, "-o", f"{out}/")
    assert r.exit_code != 0 and "names a folder" in r.stderr and "--output" in r.stderr, r.stderr
    assert not out.exists()
    out.mkdir()
    r = cli("convert", tmp_path, "-o", out)
    assert r.exit_code != 0 and "is a directory" in r.stderr, r.stderr


def test_verify_names_every_corrupt_tensor(tiny_zmoe, tmp_path):
    """verify checks the whole file: two corrupt experts are both named in its one error line."""
    once = tmp_path / "once.zmoe"
    bad = tmp_path / "bad.zmoe"
    first = _flip_expert_exponent_byte(tiny_zmoe, once, layer=0, expert=1)
    second = _flip_expert_exponent_byte(once, bad, layer=1, expert=2)
    assert first != second
    r = cli("verify", bad, "-q")
    line = assert_one_line_error(r, bad, repr(first), "CRC-32", "2 corrupt tensors in all",
                                 f"also {second!r}")
    assert "OK" not in r.stdout, line
    with zmoe.ZmoeReader(bad) as rd:
        assert [n for n, _ in rd.verify(keep_going=True)] == [first, second]
        with pytest.raises(zmoe.ChecksumError, match=repr(first)):
            rd.verify()
    with zmoe.ZmoeReader(tiny_zmoe) as rd:
        assert rd.verify(keep_going=True) == []


@pytest.mark.parametrize("cmd", [["run", "-p", "x"], ["serve"], ["perplexity", "TEXT"],
                                 ["bench"], ["profile"], ["calibrate"], ["inspect"], ["verify"],
                                 ["export", "-o", "OUT"]])
def test_a_folder_as_model_gets_the_same_line_on_every_command(tmp_path, cmd):
    """MODEL a folder (a checkpoint not yet converted): every command says the same line as
    `run` (convert it first), not click's "Invalid value for '[MODEL]'"."""
    folder = tmp_path / "hf"
    folder.mkdir()
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    args = [cmd[0], folder] + [text if a == "TEXT" else tmp_path / "out" if a == "OUT" else a
                               for a in cmd[1:]]
    r = cli(*args)
    assert r.exit_code == 1, r.stderr
    assert r.stderr == (f"error: {folder}: is a folder; convert it first with "
                        f"`zipmoe-rt convert {folder} -o model.zmoe`\n")

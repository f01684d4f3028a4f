"""``zipmoe-rt run`` and ``chat`` on a gpt-oss model (the harmony format): the final channel is
the reply on stdout, the analysis channel (reasoning) appears only with ``--show-reasoning``
(on stderr), a tool call is one note on stderr, and the markup (``<|channel|>``, ...) is never
printed. The model is the tiny random gpt-oss of tests/tiny_models.py (spec ``gpt_oss``) with
gpt-oss's chat template (llama.cpp's copy of openai/gpt-oss-120b's, test_gpt_oss.py) and a
test tokenizer whose harmony markers are special tokens, as in gpt-oss's own tokenizer. As in
test_gpt_oss_server.py, the network's logits are scripted so that greedy decoding writes a
given harmony reply, while the prompt (rendered by the real template) runs through the real
network."""
from __future__ import annotations

import json
import shutil

import pytest

import zipmoe_rt
import zipmoe_rt.api as api
import zipmoe_rt.cli_repl as cli_repl

from cli_runner import cli
from scripted import ScriptedNet
from test_api import _tokenizer_json, make_chat_model, tiny_src, tiny_zmoe  # noqa: F401 (fixtures)
from test_gpt_oss import REPLY_CALL, REPLY_FINAL, _harmony_template

MARKERS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
           "<|call|>"]
SPECIALS = ["<|startoftext|>", "<|endoftext|>"] + MARKERS
FINAL = "Paris is the capital <|of| France."     # REPLY_FINAL's final channel ('<|' is text)
REASONING = "Simple."                            # its analysis channel


def _harmony_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE over printable ASCII, space and newline with exactly ``vocab_size`` ids
    whose harmony markers are special tokens (as in gpt-oss's o200k_harmony tokenizer)."""
    return _tokenizer_json(vocab_size, SPECIALS, ["\u010a"])


@pytest.fixture(scope="module")
def gpt_oss_zmoe(tiny_moe_dir, tmp_path_factory):
    from zipmoe_rt.convert.converter import convert

    src = tiny_moe_dir("gpt_oss")
    dest = tmp_path_factory.mktemp("harmony") / "tiny-gpt-oss"
    shutil.copytree(src, dest)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = _harmony_tokenizer_json(vocab)
    (dest / "tokenizer.json").write_text(tok)
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
         "chat_template": _harmony_template()}))
    from tokenizers import Tokenizer
    t = Tokenizer.from_str(tok)
    (dest / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": [t.token_to_id("<|return|>"),
                                              t.token_to_id("<|call|>")]}))
    return convert(dest, dest.with_suffix(".zmoe"), progress=False)


@pytest.fixture
def scripted(monkeypatch):
    """``scripted(reply)``: the CLI's model loads with its network scripted to write ``reply``
    (its ``encode_chat`` calls recorded in the returned list); the kernel warm-up is skipped
    (it would advance the script)."""
    real_load = api.load
    calls: list = []

    def arm(reply):
        def load(*a, **kw):
            m = real_load(*a, **kw)
            tok = m.tokenizer
            ids = tok.encode(reply, add_special_tokens=False)
            m.net = ScriptedNet(m.net, ids, tok.token_to_id("<|return|>"), restart_on_prefill=True)
            enc = tok.encode_chat

            def encode_chat(messages, *x, **y):
                calls.append([dict(msg) for msg in messages])
                return enc(messages, *x, **y)
            tok.encode_chat = encode_chat
            return m
        monkeypatch.setattr(api, "load", load)
        monkeypatch.setattr(cli_repl, "warm_up", lambda *a, **kw: None)
        return calls
    return arm


def test_the_test_tokenizer_has_the_markers_as_single_special_tokens(gpt_oss_zmoe):
    m = zipmoe_rt.load(gpt_oss_zmoe)
    try:
        tok = m.tokenizer
        ids = tok.encode(REPLY_FINAL, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == REPLY_FINAL
        specials = [t for t in ids if tok.decode([t]) in MARKERS]
        assert len(specials) == REPLY_FINAL.count("<|") - FINAL.count("<|")
        # skipped as special tokens, the markers vanish but the channel names stay: what the
        # command line printed before splitting the channels
        assert tok.decode(ids, skip_special_tokens=True) == "analysisSimple.assistantfinal" + FINAL
    finally:
        m.close()


def test_run_prints_the_final_channel_only(gpt_oss_zmoe, scripted):
    scripted(REPLY_FINAL)
    r = cli("run", gpt_oss_zmoe, "-p", "Capital of France?")
    assert r.exit_code == 0, r.output
    assert r.stdout == FINAL + "\n"
    assert REASONING not in r.stderr and "<|" not in r.stderr
    assert "generated (stop)" in r.stderr


def test_run_show_reasoning_prints_the_analysis_channel_on_stderr(gpt_oss_zmoe, scripted):
    scripted(REPLY_FINAL)
    r = cli("run", gpt_oss_zmoe, "-p", "Capital of France?", "--show-reasoning")
    assert r.exit_code == 0, r.output
    assert r.stdout == FINAL + "\n"
    assert r.stderr.startswith(REASONING + "\n\n"), r.stderr     # then a blank line
    assert "<|" not in r.stderr and "analysis" not in r.stderr


def test_run_stop_string_applies_to_the_final_text(gpt_oss_zmoe, scripted):
    scripted(REPLY_FINAL)
    r = cli("run", gpt_oss_zmoe, "-p", "Capital of France?", "--stop", "capital")
    assert r.exit_code == 0, r.output
    assert r.stdout == "Paris is the \n"


def test_run_tool_call_is_a_note_on_stderr(gpt_oss_zmoe, scripted):
    scripted(REPLY_CALL)
    r = cli("run", gpt_oss_zmoe, "-p", "Weather in Paris?")
    assert r.exit_code == 0, r.output
    assert r.stdout == "\n"
    notes = [l for l in r.stderr.splitlines() if l.startswith("(tool call")]
    assert notes == ['(tool call get_weather({"city": "Paris"}): the command line does not '
                     'run tools)']


def test_chat_prints_final_channels_and_keeps_them_as_the_conversation(gpt_oss_zmoe, scripted):
    calls = scripted(REPLY_FINAL)
    r = cli("chat", gpt_oss_zmoe, input="Capital of France?\nAnd of Italy?\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [FINAL, FINAL]
    assert "<|" not in r.stderr and REASONING not in r.stderr
    # the second turn's prompt holds the first reply as its final text and its reasoning,
    # not the markup
    second = calls[-1]
    assert second[-2] == {"role": "assistant", "content": FINAL, "thinking": REASONING}
    assert second[-1] == {"role": "user", "content": "And of Italy?"}


def test_chat_keeps_the_final_text_before_a_stop_string(gpt_oss_zmoe, scripted):
    """``chat --stop``: the conversation keeps the final text printed, which ends before the
    stop string (not the stop string nor what followed it), with the reasoning."""
    calls = scripted(REPLY_FINAL)
    r = cli("chat", gpt_oss_zmoe, "--stop", "capital",
            input="Capital of France?\nAnd of Italy?\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["Paris is the ", "Paris is the "]
    second = calls[-1]
    assert second[-2] == {"role": "assistant", "content": "Paris is the ", "thinking": REASONING}
    assert second[-1] == {"role": "user", "content": "And of Italy?"}


def test_chat_show_reasoning(gpt_oss_zmoe, scripted):
    scripted(REPLY_FINAL)
    r = cli("chat", gpt_oss_zmoe, "--show-reasoning", input="Capital of France?\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [FINAL]
    assert r.stderr == REASONING + "\n\n"


def test_show_reasoning_without_harmony_says_it_has_no_effect(tiny_zmoe):
    r = cli("run", tiny_zmoe, "-p", "hello", "-n", 2, "--show-reasoning")
    assert r.exit_code == 0, r.output
    warnings = [l for l in r.stderr.splitlines() if l.startswith("zipmoe-rt: warning:")]
    assert warnings == ["zipmoe-rt: warning: --show-reasoning: no effect: the model's chat "
                        "template has no separate reasoning channel (harmony format)"]


def test_raw_prompt_on_harmony_is_printed_as_generated(gpt_oss_zmoe, scripted):
    """--raw completes the prompt without the chat template: nothing to split (special
    tokens skipped as for every raw completion), and --show-reasoning says so."""
    scripted(REPLY_FINAL)
    r = cli("run", gpt_oss_zmoe, "-p", "Capital of France?", "--raw", "--show-reasoning")
    assert r.exit_code == 0, r.output
    assert r.stdout == "analysisSimple.assistantfinal" + FINAL + "\n"
    assert "zipmoe-rt: warning: --show-reasoning: no effect: --raw" in r.stderr


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_take_reasoning_streams_the_analysis_text(step):
    """Pushed in pieces of any size, the analysis text taken after each piece adds up to the
    reasoning (several analysis messages joined by newlines); none of the final text."""
    from zipmoe_rt.server.harmony import HarmonySplitter

    reply = ("<|channel|>analysis<|message|>First <|thought|>.<|end|><|start|>assistant"
             "<|channel|>analysis<|message|>Second.<|end|>" + REPLY_FINAL)
    s = HarmonySplitter()
    taken, content = [], []
    for i in range(0, len(reply), step):
        content.append(s.push(reply[i:i + step]))
        taken.append(s.take_reasoning())
    content.append(s.flush())
    taken.append(s.take_reasoning())
    assert "".join(taken) == s.reasoning == "First <|thought|>.\nSecond.\nSimple."
    assert "".join(content) == FINAL
    if step == 1:
        assert sum(1 for t in taken if t) > 3      # it streams, not one piece at the end

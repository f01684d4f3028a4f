"""A chat template from a hostile file cannot hang the runtime or exhaust its memory: every render
runs under budgets of work and size (zipmoe_rt/chat_template_limits.py) and stops with
``chat_template: rendering stopped: ...``; real templates render exactly as before."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from zmoe_edit import mutate, rewrite_index

from zipmoe_rt.chat_template import compile_chat_template, render_chat_template

from test_api import TEMPLATE, make_chat_model

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Joke?"}]
NESTED_RANGE = ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
                "{% endfor %}{% endfor %}")
#: seconds a refusal may take (without the limits these run for hours and take gigabytes)
QUICK = 10


def render(source: str, messages=CONVERSATION) -> str:
    return render_chat_template(compile_chat_template(source), messages, add_generation_prompt=True,
                                tools=None, documents=None, variables={"eos_token": "</s>"})


def refused(source: str, *needles: str) -> str:
    t = time.monotonic()
    with pytest.raises(ValueError) as ei:
        render(source)
    assert time.monotonic() - t < QUICK
    msg = str(ei.value)
    assert msg.startswith("chat_template: rendering stopped: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_nested_range_bomb_is_refused():
    refused(NESTED_RANGE, "range elements", "1,0")


def test_string_multiplication_bomb_is_refused():
    refused("{{ 'x' * 1000000000 }}", "'*'", "1,000,000,000")
    refused("{{ [0] * 1000000000 }}", "'*'")


def test_big_output_loop_is_refused():
    # 400,000 iterations fit the step budget; 10,000 characters each do not fit the output budget
    refused("{% set s = 'x' * 10000 %}{% for i in range(400000) %}{{ s }}{% endfor %}",
            "the output passed")


@pytest.mark.parametrize("source, needle", [
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "'~'"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "'+'"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}"
     "{% endset %}{% endfor %}", "block"),
    ("{{ 'x'.ljust(1000000000) }}", "str.ljust"),
    ("{% set s = 'x' * 1000 %}{{ s.replace('', s).replace('', s) }}", "str.replace"),
    ("{{ '%0999999999d' % 1 }}", "'%'"),
    ("{{ '{:>999999999}'.format(1) }}", "str.format"),
    ("{{ 'x' | center(999999999) }}", "center"),
    ("{{ 7 ** 100000000 }}", "'**'"),
    ("{% for i in 'x' * 999999 %}{% for j in 'y' * 999999 %}{% endfor %}{% endfor %}", "steps"),
    ("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}", ""),
])
def test_other_growth_and_loops_are_refused(source, needle):
    refused(source, needle)


@pytest.mark.parametrize("body, needle", [
    ("{% set n = s.count('ba') %}", "calls (characters read)"),
    ("{% if 'zz' in s %}x{% endif %}", "'in' tests (characters read)"),
    ("{% if 'zz' not in s and 1 < 2 %}{% endif %}", "'in' tests (characters read)"),
    ("{% set n = s | wordcount %}", "filter 'wordcount' (characters read)"),
])
def test_reading_a_long_string_in_a_loop_is_refused(body, needle):
    """Work that stays inside the step and size budgets but reads a 3-million-character string
    400,000 times (about half an hour of scanning) is stopped by what it reads, quickly."""
    refused("{% set s = 'ab' * 1500000 %}{% for i in range(400000) %}" + body + "{% endfor %}",
            needle)


def test_in_tests_keep_their_meaning():
    """Comparison chains with ``in`` / ``not in`` (compiled to a charged comparison) give
    Python's results, chains and the usual operators included."""
    assert render("{{ 3 in [1, 2, 3] }} {{ 'a' not in 'bcd' }} {{ 1 < 2 in [True] }} "
                  "{{ 2 > 3 in [1] }} {{ 'u' in messages[1].role }} {{ 1 < 2 < 3 }} "
                  "{{ 'k' in {'k': 1} }}") == "True True False False True True True"


def test_normal_template_renders_identically():
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    src = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content ~ '\\n' }}{% if loop.last %}"
           "{{ eos_token }}{% endif %}{% endfor %}{{ range(3) | list }}{{ '%d-%s' | format(1, 'a') }}"
           "{{ ('=' * 3) + '{:>4}'.format(7) }}{{ 2 ** 10 }}{{ 'ab'.replace('a', 'xy') | center(9) }}")
    want = env.from_string(src).render(messages=CONVERSATION, eos_token="</s>",
                                       add_generation_prompt=True, tools=None, documents=None)
    assert render(src) == want
    assert render(TEMPLATE).endswith("<|im_end|><|im_start|>assistant: ")


def test_a_long_real_conversation_is_not_refused():
    big = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000}
           for i in range(1001)]          # 10 million characters, 1001 turns
    out = render(TEMPLATE, big)
    assert len(out) > 10_000_000


def test_template_render_and_generate_are_bounded_too():
    t = compile_chat_template(NESTED_RANGE)
    with pytest.raises(Exception, match="rendering stopped"):
        t.render()
    with pytest.raises(Exception, match="rendering stopped"):
        "".join(t.generate())


# -- the CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(tiny_moe_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bomb")
    good = make_chat_model(tiny_moe_dir("mixtral"), folder / "tiny")

    def set_template(index):
        index["metadata"]["tokenizer.chat_template"]["value"] = NESTED_RANGE
    return mutate(good, folder / "bomb.zmoe", lambda b: rewrite_index(b, set_template))


@pytest.mark.parametrize("args", [["verify", "-q"], ["run", "-n", "4", "-p", "Hi"]])
def test_cli_refuses_the_template_bomb(hostile, args):
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    try:
        r = subprocess.run([sys.executable, "-m", "zipmoe_rt.cli", *args[:1], str(hostile), *args[1:]],
                           env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"zipmoe-rt {args[0]} on a chat-template bomb did not finish in 240 s")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert err and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[-1].startswith("error: ") and "rendering stopped" in err[-1], err[-1]
    if args[0] == "verify":
        assert str(hostile) in err[-1] and "tokenizer.chat_template" in err[-1], err[-1]

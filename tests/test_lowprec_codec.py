"""FP8 E4M3 bit-planes (format/SPEC.md §5.1): every byte pattern round-trips through the planes,
the chunked codecs and a container, files holding them are version 3 and others stay version 2,
and the value table is the E4M3 of the OCP specification (torch's ``float8_e4m3fn``)."""
from __future__ import annotations

import numpy as np
import pytest

import zmoe
from zmoe import codec, fp8

ALL = np.arange(256, dtype=np.uint8)


def test_planes_of_every_pattern():
    exp, sm = fp8.split(ALL)
    assert exp.tolist() == [(b >> 3) & 15 for b in range(256)]
    nib = [(b >> 7) << 3 | (b & 7) for b in range(256)]
    assert sm.tolist() == [nib[2 * i] | nib[2 * i + 1] << 4 for i in range(128)]
    assert fp8.merge(exp, sm).tobytes() == ALL.tobytes()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 257])
def test_odd_counts_pad_the_last_high_nibble_with_zero(n):
    w = np.resize(ALL[::-1], n)
    exp, sm = codec.split_planes(w, "F8_E4M3")
    assert exp.size == n and sm.size == (n + 1) // 2 == codec.sm_plane_bytes("F8_E4M3", n)
    if n % 2:
        assert sm[-1] >> 4 == 0
    assert codec.merge_planes(exp, sm, "F8_E4M3").tobytes() == w.tobytes()


@pytest.mark.parametrize("exp_codec", zmoe.EXP_CODECS)
def test_chunks_with_odd_boundaries_round_trip(exp_codec):
    rng = np.random.default_rng(1)
    w = np.concatenate([ALL, rng.integers(0, 256, 100_001).astype(np.uint8)])
    sm, chunks = codec.split_compress(w, "F8_E4M3", 3, 1000, None, exp_codec)
    raws = [r for _, r in chunks]
    assert len(chunks) == 3 and raws[0] % 2 == 1          # chunk 1 starts on an odd element
    out = codec.merge_chunks([c for c, _ in chunks], raws, sm, "F8_E4M3", exp_codec)
    assert out.dtype == np.uint8 and out.tobytes() == w.tobytes()


def test_value_table_is_torch_float8_e4m3fn():
    torch = pytest.importorskip("torch")
    want = torch.from_numpy(ALL.copy()).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    got = fp8.E4M3_TO_F32
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).sum() == 2
    ok = ~np.isnan(want)
    assert got[ok].view(np.uint32).tolist() == want[ok].view(np.uint32).tolist()   # ±0 too


def _write(path, dense_dtype="F8_E4M3", expert=True):
    w = np.concatenate([ALL, ALL[::-1]])
    with zmoe.ZmoeWriter(path) as f:
        f.add_tensor("dense", dense_dtype, (w.size // 2,) if dense_dtype == "BF16" else (w.size,),
                     w, encoding="bitplane")
        if expert:
            f.write_expert(zmoe.encode_expert(0, 0, [
                zmoe.ExpertPiece("e.gate", "F8_E4M3", (3, 85), "gate", ALL[:255]),
                zmoe.ExpertPiece("e.gate_scale", "F32", (1, 1), "gate_scale",
                                 np.float32([0.5]))]))
    return w


def test_container_round_trip_and_version(tmp_path):
    w = _write(tmp_path / "a.zmoe")
    with zmoe.ZmoeReader(tmp_path / "a.zmoe") as r:
        assert r.header.version == 3 == zmoe.constants.VERSION_LOWPREC
        assert r.tensors["dense"]["encoding"] == r.tensors["e.gate"]["encoding"] == "bitplane"
        assert r.read_tensor("dense").tobytes() == w.tobytes()
        assert r.read_tensor("e.gate").tobytes() == ALL[:255].tobytes()
        assert r.read_tensor("e.gate_scale").tolist() == [[0.5]]
        r.verify()
    _write(tmp_path / "b.zmoe", dense_dtype="BF16", expert=False)
    assert zmoe.file_version(tmp_path / "b.zmoe") == 2        # nothing that needs version 3


def test_fp8_planes_in_a_version_2_file_are_refused(tmp_path):
    from zmoe_edit import mutate, set_version
    p = tmp_path / "a.zmoe"
    _write(p)
    mutate(p, p, lambda b: set_version(b, 2))
    with pytest.raises(zmoe.CorruptIndexError, match=r"tensor 'dense'.*encoding.*F8_E4M3 tensor "
                                                     r"in a version-2 file \(from version 3"):
        zmoe.ZmoeReader(p)


def test_a_short_nibble_plane_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected 2 for 3 F8_E4M3"):
        codec.merge_planes(np.zeros(3, np.uint8), np.zeros(1, np.uint8), "F8_E4M3")

"""Constants of the ``.zmoe`` container, version 2 (format/SPEC.md §1-§5)."""

MAGIC = b"ZMOE"
VERSION = 2
#: Versions this reader understands (1: zstd exponent chunks only).
READABLE_VERSIONS = (1, 2)
#: Size of the fixed header at offset 0 (SPEC §1).
HEADER_SIZE = 64
#: Default alignment of the data section and of every expert region (O_DIRECT friendly).
ALIGNMENT = 4096
#: Alignment of dense tensors inside the data section.
DENSE_ALIGNMENT = 64

#: Tensor encodings (SPEC §4).
ENC_RAW = "raw"
ENC_BITPLANE = "bitplane"

#: Bit-plane layouts per floating dtype: (exponent bits, mantissa bits, word bytes, SM bytes).
#: SM = sign bit above the mantissa bits, little-endian, in the fewest whole bytes (SPEC §5).
BITPLANE_DTYPES = {
    "BF16": (8, 7, 2, 1),
    "F16": (5, 10, 2, 2),
    "F32": (8, 23, 4, 3),
}

#: Element size in bytes of every dtype the container stores (safetensors names).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Metadata value types (SPEC §3).
META_TYPES = ("bool", "int", "float", "str", "int[]", "float[]", "str[]", "json")

#: Exponent-chunk codecs (SPEC §5.2): canonical Huffman in 4 streams (§5.3), or zstd frames.
EXP_HUFFMAN = "huffman"
EXP_ZSTD = "zstd"
EXP_CODECS = (EXP_HUFFMAN, EXP_ZSTD)
DEFAULT_EXP_CODEC = EXP_HUFFMAN

#: Default number of independently compressed exponent chunks per tensor (ZipMoE uses 3-5).
DEFAULT_CHUNKS = 4
#: Chunks are never cut smaller than this many exponents (zstd table overhead stays < 1 %).
MIN_CHUNK = 64 * 1024

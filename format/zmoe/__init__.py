"""zmoe: reader, writer and bit-plane codec of the ``.zmoe`` container (format/SPEC.md).

Stands alone (numpy + zstandard), like gguf-py: it knows nothing of inference. When Numba is
installed, the Huffman exponent codec uses its compiled kernels (same bytes, ~100x faster).
"""
from .constants import (ALIGNMENT, BITPLANE_DTYPES, DEFAULT_CHUNKS, DEFAULT_EXP_CODEC, ENC_BITPLANE,
                        ENC_MXFP4, ENC_RAW, EXP_CODECS, MAGIC, VERSION, VERSION_LOWPREC, Keys,
                        hparam_key, metadata_keys)
from .errors import (ChecksumError, CorruptIndexError, NotZmoeError, TruncatedFileError,
                     UnsupportedCodecError, UnsupportedVersionError, ZmoeError)
from .reader import NUMPY_DTYPES, ZmoeReader, bits_per_weight, file_version
from .writer import EncodedExpert, ExpertPiece, ZmoeWriter, encode_expert

__all__ = [
    "ALIGNMENT", "BITPLANE_DTYPES", "DEFAULT_CHUNKS", "DEFAULT_EXP_CODEC", "ENC_BITPLANE", "ENC_RAW",
    "ENC_MXFP4", "EXP_CODECS", "MAGIC", "VERSION", "VERSION_LOWPREC", "Keys", "hparam_key",
    "metadata_keys",
    "ChecksumError", "CorruptIndexError", "NotZmoeError", "TruncatedFileError",
    "UnsupportedCodecError", "UnsupportedVersionError", "ZmoeError",
    "NUMPY_DTYPES", "ZmoeReader", "bits_per_weight", "file_version",
    "EncodedExpert", "ExpertPiece", "ZmoeWriter", "encode_expert",
]

"""zmoe: reader, writer and bit-plane codec of the ``.zmoe`` container (format/SPEC.md).

Stands alone (numpy + zstandard), like gguf-py: it knows nothing of inference.
"""
from .constants import ALIGNMENT, BITPLANE_DTYPES, DEFAULT_CHUNKS, ENC_BITPLANE, ENC_RAW, MAGIC, VERSION
from .errors import (ChecksumError, CorruptIndexError, NotZmoeError, TruncatedFileError,
                     UnsupportedVersionError, ZmoeError)
from .reader import NUMPY_DTYPES, ZmoeReader, bits_per_weight
from .writer import EncodedExpert, ExpertPiece, ZmoeWriter, encode_expert

__all__ = [
    "ALIGNMENT", "BITPLANE_DTYPES", "DEFAULT_CHUNKS", "ENC_BITPLANE", "ENC_RAW", "MAGIC", "VERSION",
    "ChecksumError", "CorruptIndexError", "NotZmoeError", "TruncatedFileError",
    "UnsupportedVersionError", "ZmoeError", "NUMPY_DTYPES", "ZmoeReader", "bits_per_weight",
    "EncodedExpert", "ExpertPiece", "ZmoeWriter", "encode_expert",
]

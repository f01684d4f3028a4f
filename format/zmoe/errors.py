"""Errors raised by the ``.zmoe`` reader and writer. Every message names the file, and where it
applies the tensor and the stored piece at fault."""


class ZmoeError(ValueError):
    """Base class: the file is not a usable ``.zmoe`` container."""


class NotZmoeError(ZmoeError):
    """The file does not start with the ``ZMOE`` magic (SPEC §1)."""


class UnsupportedVersionError(ZmoeError):
    """The file's format version is newer (or older) than this reader supports (SPEC §1)."""


class TruncatedFileError(ZmoeError):
    """The file is shorter than its header records, or a region lies past its end."""


class CorruptIndexError(ZmoeError):
    """The header or index fails its CRC-32, or the index is not valid (SPEC §2)."""


class ChecksumError(ZmoeError):
    """A stored piece (raw tensor, sign+mantissa plane, exponent chunk) fails its CRC-32."""


class UnsupportedCodecError(ZmoeError):
    """A bit-plane tensor's exponent codec is unknown to this reader (SPEC §5.2)."""

"""The converter's error and warning classes (shared by :mod:`.converter` and
:mod:`.metadata`)."""
from __future__ import annotations


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file, tensor or option."""


class ConversionWarning(UserWarning):
    """The conversion succeeds but the output lacks something a user will need (e.g. no
    tokenizer: ``run``/``chat`` cannot use the file)."""

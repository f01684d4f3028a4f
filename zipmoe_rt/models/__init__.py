"""Model architectures (one small module per family; shared blocks in
:mod:`.rope`, :mod:`.cache`, :mod:`.attention`, :mod:`.moe`, :mod:`.model`, re-exported by
:mod:`.base`) and the weight-source interface they consume (:mod:`.weights`).

Use :func:`build_model` to get the right class for a source's ``hparams["family"]``.
"""
from __future__ import annotations

import importlib

from ..families import all_families, get_family

#: family (``hparams["family"]``) -> module under this package, from the family registry
#: (:mod:`zipmoe_rt.families`, each family's ``model_module``).
FAMILIES = {f.family: f.model_module for f in all_families()}


def build_model(source, executor=None, backend=None):
    """Build the runtime model for a weight source.

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource` (``hparams["family"]`` picks
            the architecture module).
        executor: optional expert executor (default:
            :class:`~zipmoe_rt.models.moe.ExpertExecutor` on ``backend``); one with a
            ``backend`` attribute must use the same backend.
        backend: compute backend, a name (``"numba"``, the default; ``"numpy"``) or a
            :class:`~zipmoe_rt.backends.base.Backend`.
    Returns:
        a :class:`~zipmoe_rt.models.model.Model` subclass instance.
    Raises:
        ValueError: unknown or missing family (:class:`~zipmoe_rt.families.UnknownFamilyError`,
            the message lists the supported ones), unknown backend, or an executor on another
            backend.
        KeyError: a dense tensor is missing from the source.
    """
    mod = get_family(source.hparams.get("family")).model_module
    return importlib.import_module(f".{mod}", __name__).Model(source, executor, backend)

"""A network whose logits are scripted, for the tests of what is done with a model's reply
(tool calls, the harmony format): greedy decoding writes a given reply while the prompt still
runs through the real network."""
from __future__ import annotations

import numpy as np


class ScriptedNet:
    """The model's network with its logits replaced so that greedy decoding writes ``script``
    (token ids) and then EOS; the forward pass itself still runs (the KV cache stays real).
    With ``restart_on_prefill`` the script starts again after every prefill (a forward pass
    over more than one token)."""

    def __init__(self, net, script, eos, restart_on_prefill: bool = False):
        self._net, self._script, self._eos, self._i = net, list(script), eos, 0
        self._restart = restart_on_prefill

    def __getattr__(self, name):
        return getattr(self._net, name)

    def forward(self, ids, cache, last_only=True):
        """One forward pass of the real network; returns the scripted logits of one token."""
        out = np.asarray(self._net.forward(ids, cache, last_only=last_only))
        if self._restart and len(ids) > 1:
            self._i = 0
        logits = np.full(out.shape[-1], -30.0, np.float32)
        logits[self._script[self._i] if self._i < len(self._script) else self._eos] = 30.0
        self._i += 1
        return logits

"""Argument checks of the Python API's generation methods (:mod:`zipmoe_rt.api`): the
sampling keywords each takes, and ``max_tokens=-1`` (no limit, as the CLI's ``-n -1``)."""
from __future__ import annotations

#: the sampling keywords of ``generate`` / ``stream`` / ``chat`` / ``ChatSession.send``
#: (:meth:`zipmoe_rt.api.Model.sampling`)
SAMPLING_ARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
#: ``max_tokens=-1``: until a stop token, a stop string or the full context (llama.cpp's ``-n -1``)
NO_LIMIT = -1


def check_sampling_args(method: str, sampling: dict, takes: tuple[str, ...]) -> None:
    """Refuse a keyword ``method`` does not take, naming the public method and what it takes
    (not an internal function's name).

    Raises:
        TypeError: ``"Model.chat() got an unexpected keyword argument 'x'; it takes ..."``.
    """
    for k in sampling:
        if k not in SAMPLING_ARGS:
            raise TypeError(f"{method}() got an unexpected keyword argument {k!r}; it takes "
                            f"{', '.join(takes + SAMPLING_ARGS)}")


class ContextWarning(UserWarning):
    """A sequence asked of a model with no ``ctx_size`` reaches past the positions the model
    was trained for (``max_position_embeddings``): transformers' "exceeds the model's
    predefined maximum length" reminder, llama.cpp's ``n_ctx > n_ctx_train`` warning."""


def past_trained_context(model, n_tokens: int) -> str | None:
    """The :class:`ContextWarning` text when a sequence of ``n_tokens`` ids (cached and new)
    passes ``model``'s ``max_position_embeddings``, else None (it fits, or the trained length
    is unknown). A reply that would run past it is not warned of in advance: it may stop
    before."""
    trained = model.hparams.get("max_position_embeddings")
    if not trained or n_tokens <= int(trained):
        return None
    return (f"prompt: {n_tokens} tokens are more than the {int(trained)} positions the model "
            f"was trained for (max_position_embeddings); output past that position may "
            f"degrade (set Model.ctx_size to refuse such prompts)")


def full_context(model) -> int:
    """The context in tokens that ``max_tokens=-1`` may fill: ``model.ctx_size``, else the
    context a memory limit planned its KV cache for, else the model's
    ``max_position_embeddings`` (a very large number if unknown)."""
    if model.ctx_size is not None:
        return model.ctx_size
    plan = getattr(model, "memory_plan", None)
    if plan is not None:
        return plan.context
    n = model.hparams.get("max_position_embeddings")
    return int(n) if n else 2**31 - 1

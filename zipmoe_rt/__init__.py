"""zipmoe-rt: lossless BF16 Mixture-of-Experts runtime (ZipMoE, arXiv 2601.21198).

Embedding API::

    import zipmoe_rt
    model = zipmoe_rt.load("model.zmoe")          # or load() for the bundled default model
    print(model.generate("The capital of France is", max_tokens=16))
    for piece in model.stream("Tell me a story", max_tokens=64):
        print(piece, end="", flush=True)
    reply = model.chat([{"role": "user", "content": "Hi!"}])
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package stays cheap (no numba compile)
    if name in ("load", "Model", "ChatSession", "default_model_path"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)

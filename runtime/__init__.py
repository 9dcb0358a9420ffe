"""adadecode's decoding engine: the sans-I/O core (Coordinator, Stage), the model runner and the runners."""


def __getattr__(name):
    # Lazy, so that importing the state machines does not load transformers.
    if name in ("Engine", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'adadecode.runtime' has no attribute {name!r}")


__all__ = ["Engine", "GenerationResult"]

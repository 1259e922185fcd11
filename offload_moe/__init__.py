"""offload_moe: run Mixture-of-Experts models on one memory-constrained GPU by offloading experts.

    from offload_moe import Engine, EngineOptions, Sampling
    engine = Engine.load("path/to/Mixtral-8x7B", profile="24gb")
    print(engine.generate("[INST] Hi [/INST]", max_new_tokens=32).text)
"""

import importlib

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic version)
_EXPORTS = {"Engine": "engine", "EngineOptions": "options", "GenerationResult": "generate", "Sampling": "sampling",
            "Scheduler": "batch", "UserError": "errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """The exports, imported on first use: what needs no model (`simulate`) starts without torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

"""offload_moe: run Mixture-of-Experts models on one memory-constrained GPU by offloading experts.

    from offload_moe import Engine, EngineOptions, Sampling
    engine = Engine.load("path/to/Mixtral-8x7B", profile="24gb")
    print(engine.generate("[INST] Hi [/INST]", max_new_tokens=32).text)
"""

from .batch import Scheduler
from .engine import Engine, EngineOptions
from .errors import UserError
from .generate import GenerationResult, Sampling

__all__ = ["Engine", "EngineOptions", "GenerationResult", "Sampling", "Scheduler", "UserError"]

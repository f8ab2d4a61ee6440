"""carvq: CARVQ embedding compression for llama.cpp models."""
from carvq.errors import CarvqError

__version__ = "0.1.0"

__all__ = ["CarvqError", "Model", "__version__"]


def __getattr__(name):
    # lazy: `import carvq` must not load libllama (or torch) until it is used
    if name == "Model":
        from carvq.runtime.model import Model

        return Model
    raise AttributeError(name)

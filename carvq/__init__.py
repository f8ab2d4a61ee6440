"""carvq: CARVQ embedding compression for llama.cpp models."""
from carvq.errors import CarvqError

__version__ = "0.1.0"

__all__ = ["CarvqError", "__version__"]

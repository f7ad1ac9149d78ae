"""plait: distributed training and serving of PyTorch models on an explicit dp × pp × tp mesh.

`import plait` stays light (no torch) so that `plait --help` answers at once; the public names
below load their modules on first use (PEP 562), which is also why no submodule imports this
package's namespace.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "plait.config",
    "load_config": "plait.config",
    "PlaitError": "plait.errors",
    "ParallelMesh": "plait.mesh",
    "ParallelModel": "plait.parallel.base",
    "parallelize": "plait.parallel.parallelize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

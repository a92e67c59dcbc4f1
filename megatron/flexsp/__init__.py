"""FlexSP: heterogeneous sequence parallelism for long-context training on megatron.core.

This is a namespace portion next to the installed ``megatron.core``: there is deliberately
no ``megatron/__init__.py`` in this repository.
"""

__version__ = "0.1.0"

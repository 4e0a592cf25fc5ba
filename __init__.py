"""memzoo: memory-efficient optimizers for PyTorch.

Every optimizer is three layers that agree with each other: a ``torch.optim.Optimizer``
in :mod:`memzoo.optim`, its pure-PyTorch math in :mod:`memzoo.reference`, and Triton
kernels with the same signatures in :mod:`memzoo.triton_kernels`.
"""

from memzoo.optim import Lion, MemzooOptimizer, create_optimizer, list_optimizers

__version__ = "0.1.0.dev0"

__all__ = ["Lion", "MemzooOptimizer", "__version__", "create_optimizer", "list_optimizers"]

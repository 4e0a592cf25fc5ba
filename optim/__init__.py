"""User-facing memzoo optimizers (``torch.optim.Optimizer`` subclasses)."""

from memzoo.optim.apollo import APOLLO
from memzoo.optim.base import MemzooOptimizer, resolve_backend
from memzoo.optim.frugal import FRUGAL
from memzoo.optim.galore import GaLoreAdamW, NaturalGaLore
from memzoo.optim.lion import Lion
from memzoo.optim.registry import OPTIMIZERS, get_optimizer_info, list_optimizers

__all__ = ["APOLLO", "FRUGAL", "OPTIMIZERS", "GaLoreAdamW", "Lion", "NaturalGaLore", "MemzooOptimizer", "get_optimizer_info", "list_optimizers", "resolve_backend"]

"""User-facing memzoo optimizers (``torch.optim.Optimizer`` subclasses)."""

from memzoo.optim.adam_mini import AdamMini
from memzoo.optim.apollo import APOLLO
from memzoo.optim.base import MemzooOptimizer, resolve_backend
from memzoo.optim.cosmos import COSMOS
from memzoo.optim.frugal import FRUGAL
from memzoo.optim.fira import FiraAdamW
from memzoo.optim.galore import GaLoreAdafactor, GaLoreAdamW, NaturalGaLore
from memzoo.optim.layerwise import LayerwiseOptimizer
from memzoo.optim.lion import Lion
from memzoo.optim.factory import create_optimizer, list_optimizers, target_parameters
from memzoo.optim.registry import OPTIMIZERS, get_optimizer_info
from memzoo.optim.zeroth_order import QZO, MeZO, SparseMeZO, collect_quantization_scales

__all__ = ["APOLLO", "AdamMini", "COSMOS", "FRUGAL", "FiraAdamW", "OPTIMIZERS", "QZO", "GaLoreAdafactor", "GaLoreAdamW", "LayerwiseOptimizer", "Lion", "MeZO", "MemzooOptimizer", "NaturalGaLore",
           "SparseMeZO", "collect_quantization_scales", "create_optimizer", "get_optimizer_info", "list_optimizers",
           "resolve_backend", "target_parameters"]

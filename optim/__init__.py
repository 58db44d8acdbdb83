"""Optimizers and schedules: Muon, parameter grouping, LR schedules (docs/models.md, "Optimizers")."""

from .build import CombinedOptimizer, build_optimizer
from .config import OptimConfig, default_optim_config
from .groups import build_param_groups, check_partition
from .muon import Muon, zeropower_via_newtonschulz5
from .schedules import apply_schedule, lr_factor, muon_momentum

__all__ = [
    "CombinedOptimizer",
    "Muon",
    "OptimConfig",
    "apply_schedule",
    "build_optimizer",
    "build_param_groups",
    "check_partition",
    "default_optim_config",
    "lr_factor",
    "muon_momentum",
    "zeropower_via_newtonschulz5",
]

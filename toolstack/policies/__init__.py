"""Precopy policies: what ferryd answers the save helper after every batch.

The interface (`Policy`, `Decision`) is in base.py, ferry's own policies in
builtin.py, the estimator they share with job stats in estimate.py, the
time budget every call runs under in guard.py, and where policies come from
(builtins, --policy-module, entry points) in registry.py.
"""

from .base import Decision, Policy, PolicyError
from .builtin import ConvergePolicy, XenPolicy
from .estimate import Estimator
from .guard import DEFAULT_BUDGET_MS, PolicyFailed, decide
from .registry import ENTRY_POINT_GROUP, PolicyRegistry

__all__ = [
    "DEFAULT_BUDGET_MS",
    "ENTRY_POINT_GROUP",
    "ConvergePolicy",
    "Decision",
    "Estimator",
    "Policy",
    "PolicyError",
    "PolicyFailed",
    "PolicyRegistry",
    "XenPolicy",
    "decide",
]

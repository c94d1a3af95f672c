"""EFA / NCCL / libfabric environment tuning that knows the stack.

``hpresil-run --net-env off|auto|<family>`` detects the host
(:func:`detect`), evaluates the rule table (:data:`RULES`) into a :class:`Plan`
and applies its ``set`` decisions through :mod:`hpresil.netenv.env`, never
overriding a user's value. ``hpresil-run doctor`` prints the same plan.
"""

from hpresil.netenv.api import Decision, Facts, HostRoots, NetEnvConfig, Plan, Rule
from hpresil.netenv.detect import detect
from hpresil.netenv.plan import evaluate, make_plan
from hpresil.netenv.families import FAMILIES
from hpresil.netenv.rules import RULES

__all__ = ["Decision", "Facts", "HostRoots", "NetEnvConfig", "Plan", "Rule", "detect", "evaluate", "make_plan",
           "FAMILIES", "RULES"]

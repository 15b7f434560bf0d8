"""Training engines: backprop, gradient learning (ColA), zeroth order (MeZO).

Every engine implements ``Engine`` from ``cotune.engines.base`` and is built by ``make_engine``; the
trainer, the tenant bank and the service drive them only through that interface.
"""

from cotune.engines.base import Engine, OptimConfig, StepResult, make_engine, make_optimizer, make_scheduler

__all__ = ["Engine", "OptimConfig", "StepResult", "make_engine", "make_optimizer", "make_scheduler"]

"""ColA gradient learning: the server captures ``(u, δ)``, fitters update the adapters.

Public classes, each usable on its own (the multi-tenant bank reuses them per tenant):

* ``GradientLearningEngine`` — the ``Engine``: forward/backward with no trainable parameter, pairs
  shipped from inside the backward pass, one fitter step per update interval; merged mode, bf16 wire,
  sufficient statistics, NaN/inf skipping, dead/hung fitter detection.
* ``Capture`` / ``SiteRecord`` — the server-side capture: one record per (site path, call) with ``u`` and
  ``δ`` batch-first (rows can be split by tenant), the call's seed for stochastic adapters.
* ``Pair`` / ``Statistic`` / ``Wire`` — the messages a fitter consumes and the packer that picks the
  wire dtype and the sufficient statistic and counts bytes; ``affine_in_u`` decides, numerically and
  without naming families, which adapters admit the statistic.
* ``Fitter`` — owns an adapter set's trainable modules, optimizer and schedule; ``add(msg)`` accumulates
  the local objective's gradient, ``step()`` makes one optimizer step. Independent of how pairs were
  produced.
* ``make_fitter(placement, adapters, optim, ...)`` — a ``FitterHandle`` running a ``Fitter`` inline, in a
  thread, in a worker process or in a Ray actor; after ``step()`` the server's adapters hold the new
  weights.
"""

from cotune.engines.gradient_learning.capture import Capture, SiteRecord
from cotune.engines.gradient_learning.engine import GradientLearningEngine
from cotune.engines.gradient_learning.fitter import Fitter
from cotune.engines.gradient_learning.placement import (
    PLACEMENTS,
    FitterHandle,
    InlineFitter,
    ProcessFitter,
    RayFitter,
    ThreadFitter,
    make_fitter,
    private_copies,
    publish,
)
from cotune.engines.gradient_learning.wire import Message, Pair, Statistic, Wire, affine_in_u, site_widths

__all__ = [
    "PLACEMENTS",
    "Capture",
    "Fitter",
    "FitterHandle",
    "GradientLearningEngine",
    "InlineFitter",
    "Message",
    "Pair",
    "ProcessFitter",
    "RayFitter",
    "SiteRecord",
    "Statistic",
    "ThreadFitter",
    "Wire",
    "affine_in_u",
    "make_fitter",
    "private_copies",
    "publish",
    "site_widths",
]

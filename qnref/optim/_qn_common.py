"""Temporary re-exports for modules that still import the old quasi-Newton helpers.

The pieces that lived here moved (issue 16): opening/closing a step and φ(α) on one batch to
:mod:`~.drivers` (:func:`~.drivers.open_step`, :func:`~.drivers.stay`,
:class:`~.drivers.LineFunction`, :func:`~.drivers.line_search`), the pair memory and its
checkpoint form to :class:`~.pairs.PairStore`. ``first_order.py`` imports ``LineFunction`` from
here until it switches to :func:`~.drivers.line_search`; then this module goes.
"""
from __future__ import annotations

from .drivers import LineFunction

__all__ = ["LineFunction"]

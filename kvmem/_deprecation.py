"""Renamed keyword arguments keep working for one release, with a DeprecationWarning that names the new one."""

from __future__ import annotations

import warnings


def renamed(kwargs: dict, old: str, new: str, value, *, where: str):
    """``kwargs.pop(old)`` (warning that ``where``'s ``old=`` is now ``new=``) if the caller passed ``old``, else
    ``value``. Any other leftover keyword in ``kwargs`` is the caller's to refuse."""
    if old not in kwargs:
        return value
    warnings.warn(f"{where}: {old}= is renamed {new}= (one word per meaning: 'budget' is only the recompute "
                  "budget now)", DeprecationWarning, stacklevel=3)
    return kwargs.pop(old)

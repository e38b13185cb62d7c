"""--set MODULE.ATTR=VALUE for the benchmarks: a module constant (a switch or a tuning number)
replaced before anything is traced, so two settings can be timed in one device session."""

from __future__ import annotations

import importlib


def apply_overrides(settings, log=print):
    """Each "MODULE.ATTR=VALUE" sets the module's attribute to int(VALUE) (True / False for a bool
    attribute). Unknown modules or attributes raise rather than silently time the default."""
    for item in settings:
        name, sep, value = item.partition("=")
        mod_name, _, attr = name.rpartition(".")
        if not sep or not mod_name:
            raise ValueError(f"--set wants MODULE.ATTR=VALUE, got {item!r}")
        mod = importlib.import_module(mod_name)
        if not hasattr(mod, attr):
            raise ValueError(f"--set: {mod_name} has no attribute {attr!r}")
        new = int(value)
        if isinstance(getattr(mod, attr), bool):
            new = bool(new)
        setattr(mod, attr, new)
        log(f"set {mod_name}.{attr} = {new}")

"""Methods: one module each (its options, hooks and registration); ``petmix.methods.base`` holds the
registry. Importing this package imports every module in it, so a method added as a new file here is
known to every command without touching anything else (SAPT first: ``petmix methods`` lists it first)."""

import importlib
import pkgutil

from petmix.methods.base import (
    METHODS,
    Method,
    StageHook,
    foreign_options,
    get_method,
    option_fields,
    register_method,
    setting,
)

for _module in ["sapt"] + sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "sapt")):
    importlib.import_module(f"{__name__}.{_module}")

DEFAULT_METHOD = "sapt-lora"  # what `petmix train` runs when no method is named

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "StageHook", "foreign_options", "get_method", "option_fields",
           "register_method", "setting"]

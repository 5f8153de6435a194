"""Distillation methods, registered by name (`registry.py`).

Importing the package imports every module in it, so a method registers by being a file here: nothing else names it.
"""

import importlib
import pkgutil

from .registry import (Method, MethodConfig, get_method, list_methods, register_method, register_presets,
                       registered_presets)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "MethodConfig", "get_method", "list_methods", "register_method", "register_presets",
           "registered_presets"]

"""Optional packages: imported where they are needed, with an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} needs the '{module.split('.')[0]}' package: pip install 'fogzo[{extra}]'") from error

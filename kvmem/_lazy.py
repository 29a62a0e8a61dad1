"""Public names that load on first use (PEP 562), for the packages whose import must stay light.

`kvmem`, `kvmem.store` and `kvmem.travel` list their public names with the module that defines each; importing the
package imports none of those modules (so `import kvmem` and the `kvmem` command start without torch, and the
store's record rules without cryptography), and the first read of a name imports its module and keeps the value as
a plain attribute.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, public: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``(__getattr__, __dir__)`` pair for ``package``: ``public`` maps each name to the module (relative to
    ``package``) that defines it. An unknown name raises AttributeError as a plain module would."""

    def __getattr__(name: str) -> Any:
        module = public.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__

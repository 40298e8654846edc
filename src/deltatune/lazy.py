"""``lazy("torch")``: a module imported when one of its attributes is first read.

`validate`, `methods` and `tasks` only read configs and registries, yet they import every method and
task module; with torch, transformers and peft imported at the top of those, each took 4-5 s to start.
Those modules bind heavy libraries with ``torch = lazy("torch")``: only commands that compute pay.

On first use the proxy copies the module's namespace into its own, so later reads are plain attribute
reads. A name the module gains afterwards is read from the module; one it rebinds afterwards is not seen.
"""

from __future__ import annotations

import importlib
import types


class _LazyModule(types.ModuleType):
    def __getattr__(self, name: str):
        """Called only for names not in the proxy's namespace: import, copy the namespace once, answer."""
        module = importlib.import_module(self.__name__)
        if not self.__dict__.get("_lazy_loaded"):
            self.__dict__.update(module.__dict__)
            self.__dict__["_lazy_loaded"] = True
        return getattr(module, name)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy(name: str) -> types.ModuleType:
    """A stand-in for module ``name`` (e.g. "torch.nn.functional") that imports it on first attribute access."""
    return _LazyModule(name)

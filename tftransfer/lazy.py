"""Lazy re-exports (PEP 562) for packages whose import must stay cheap.

`import tftransfer`, `tftransfer.export` and `tftransfer.distill` load
neither TensorFlow nor Keras: an entrypoint run as `python -m
tftransfer.export` imports those packages before its own code runs, and it
must set up logging (`tftransfer.quiet_logs`) before TensorFlow starts.
A public name is imported from its defining module on first access.
"""

import importlib


def lazy_exports(package, modules, namespace):
    """`(__getattr__, __dir__, __all__)` for `package`, resolving names on first use.

    Args:
        package: str. The package's `__name__`.
        modules: dict. Defining module -> the public names it gives the
            package. Other names are tried as submodules (`tftransfer.distill`).
        namespace: dict. The package's `globals()`, where resolved names
            are cached.

    Returns:
        tuple of two functions to assign to the package's `__getattr__` and
        `__dir__`, and the sorted public names (its `__all__`).
    """
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)

"""The package's layering, checked on the source (no imports run).

Layers, bottom to top: the library (backbones, heads, data, losses, ...),
the feature packages built on it (`tftransfer.distill`, `tftransfer.export`,
`tftransfer.report`), and the entrypoint layer (`cli`, `experiment` and the
`python -m` modules). A module never imports a layer above its own, nor the
package `tftransfer` itself (its `__init__` only re-exports, lazily).
"""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "tftransfer")
FEATURES = ("tftransfer.distill", "tftransfer.export", "tftransfer.report")
ENTRYPOINTS = ("tftransfer.cli", "tftransfer.experiment", "tftransfer.train", "tftransfer.evaluate",
               "tftransfer.compare", "tftransfer.pretrain", "tftransfer.distill.__main__",
               "tftransfer.export.__main__")


def _layer(module):
    if module in ENTRYPOINTS or module.endswith(".__main__"):
        return 2
    if module.startswith(FEATURES):
        return 1
    return 0


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield module.removesuffix(".__init__"), path


def _imports(path):
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tftransfer":  # `from tftransfer import x`: the submodule x
                yield from (f"tftransfer.{a.name}" for a in node.names)
            else:
                yield node.module


def test_no_module_imports_a_higher_layer_or_the_package():
    violations = []
    for module, path in _modules():
        if module in ("tftransfer", "tftransfer.lazy"):
            continue
        for target in _imports(path):
            if not target.startswith("tftransfer"):
                continue
            if target == "tftransfer":
                violations.append(f"{module} imports the package tftransfer")
            elif _layer(target) > _layer(module) and not target.startswith(module + "."):
                violations.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not violations, "\n".join(violations)

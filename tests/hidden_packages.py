"""A preamble for a fresh interpreter in which some packages look uninstalled: to imports and
to package metadata alike (torchmetrics, which Lightning imports, imports transformers when its
metadata says it is installed, so blocking the import alone would break Lightning)."""

HIDE = """
import importlib.metadata as metadata, sys
HIDDEN = {names!r}

class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hidden())
_distribution = metadata.distribution

def distribution(name):
    if name.lower().replace("_", "-") in {{n.replace("_", "-") for n in HIDDEN}}:
        raise metadata.PackageNotFoundError(name)
    return _distribution(name)

metadata.distribution = distribution
"""

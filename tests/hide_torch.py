"""Python lines that make a child process run as if torch were not installed."""

# Run first in a child process: torch is hidden from the path finder, as if it were not installed, so `import torch`
# fails and transformers' availability check (importlib.util.find_spec) finds none. (A finder that raised
# ImportError would break that check instead.) In the JAX environment torch is absent anyway.
HIDE_TORCH = """
import importlib.machinery, sys

class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
"""

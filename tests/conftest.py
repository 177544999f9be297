import sys
from pathlib import Path

import pytest

from rrise.datasets import DEBIAN_FASHION_DIR

FASHION_AVAILABLE = (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()

# Run a Python snippet with torch made unimportable, as on an edge image without it.
NO_TORCH_PRELUDE = """
import sys, importlib.abc
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this edge image")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(autouse=True)
def _fixed_spot_check_seed(monkeypatch):
    """`--verify`'s Monte Carlo spot-check takes a fresh seed in use, so a sound bundle fails it with
    probability up to its level (10⁻³); tests run in this process take one fixed seed instead."""
    import rrise.count_check

    monkeypatch.setattr(rrise.count_check, "fresh_seed", lambda: 20261207)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real bundle (digits CNN, real MC calibration) and a folder of frames with one corrupt file."""
    from tests.tiny_bundle import make_tiny_bundle

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_bundle(root / "bundle", root / "frames")
    return root / "bundle"


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable

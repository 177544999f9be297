"""Optional packages of the runtime, imported only when an option needs them.

The ``robotics`` extra (``pip install 'rrise[robotics]'``) brings MCAP, ROS 2 bag and Foxglove
support; without it the runtime installs and runs as before, and an option that needs one of its
packages fails with a message that names the option, the package and the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]

# import name -> (distribution name, extra that installs it)
_PACKAGES = {
    "mcap": ("mcap", "robotics"),
    "mcap_ros2": ("mcap-ros2-support", "robotics"),
    "rosbags": ("rosbags", "robotics"),
    "foxglove": ("foxglove-sdk", "robotics"),
    "google.protobuf": ("protobuf", "robotics"),
}


class MissingExtraError(RuntimeError):
    """An option needs a package that is not installed; the message says how to install it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose`` (e.g. ``"--record"``), or raise :class:`MissingExtraError`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module if module in _PACKAGES else module.split(".")[0]
        dist, extra = _PACKAGES.get(top, (top, "robotics"))
        raise MissingExtraError(
            f"{purpose} needs the Python package {dist!r} ({exc}): install it with "
            f"pip install 'rrise[{extra}]'"
        ) from None

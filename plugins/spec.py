"""Hook specifications: the contract between kfopt and its plugins.

Built-in techniques implement these hooks exactly like third-party packages do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .technique import Technique

hookspec = pluggy.HookspecMarker("kfopt")
hookimpl = pluggy.HookimplMarker("kfopt")


@hookspec
def kfopt_register_techniques(register: Callable[["Technique"], None]) -> None:
    """Register optimization techniques by calling ``register(technique_instance)``.

    Called once when the plugin manager is built. Return value is ignored.
    Registering a name that is already taken raises an error naming both owners.
    """

"""The kfopt plugin contract and the built-in techniques.

A plugin module implements :func:`kfopt_register_techniques` with ``@hookimpl``
and is listed under the ``kfopt`` entry-point group of its package.
"""

from kfopt.errors import TechniqueSkipped

from .spec import hookimpl, hookspec
from .technique import FORMATS, ModelHandle, StepContext, Technique

__all__ = ["hookimpl", "hookspec", "Technique", "ModelHandle", "StepContext", "TechniqueSkipped", "FORMATS"]

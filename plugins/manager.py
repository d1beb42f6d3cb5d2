"""Builds the plugin manager: built-ins first, then installed entry points."""

from __future__ import annotations

import importlib
import os
import warnings
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import pluggy

from kfopt.errors import KfoptError, did_you_mean

from . import spec
from .technique import Technique

if TYPE_CHECKING:
    from kfopt.task import Metric

ENTRY_POINT_GROUP = "kfopt"

#: Built-in techniques, metrics and observers, registered through the same hooks as third-party plugins.
DEFAULT_PLUGINS = (
    "kfopt.plugins.metrics",
    "kfopt.plugins.prune",
    "kfopt.plugins.quantize",
    "kfopt.plugins.distill",
    "kfopt.plugins.accelerate",
    "kfopt.plugins.mlflow_tracker",
)


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and was skipped."""


class Registry:
    """Techniques and metrics by name, with the plugin that registered each."""

    def __init__(self, pm: KfoptPluginManager):
        self.pm = pm
        self.techniques: dict[str, Technique] = {}
        self.owners: dict[str, str] = {}
        self.metrics: dict[str, Metric] = {}
        self.metric_owners: dict[str, str] = {}
        self._collect(pm.hook.kfopt_register_techniques, self._add, "techniques")
        self._collect(pm.hook.kfopt_register_metrics, self._add_metric, "metrics")

    def _collect(self, hook, add, what: str) -> None:
        for impl in hook.get_hookimpls():
            owner = _owner_of(self.pm, impl.plugin)
            try:
                impl.function(register=lambda item, owner=owner: add(item, owner))
            except KfoptError:
                raise
            except Exception as exc:  # a plugin's bug must not break every command
                warnings.warn(
                    f"kfopt plugin {owner} failed to register its {what} and was skipped: {type(exc).__name__}: {exc}",
                    PluginLoadWarning,
                    stacklevel=3,
                )

    def _add_metric(self, metric: Metric, owner: str) -> None:
        from kfopt.task import Metric

        if not isinstance(metric, Metric):
            raise TypeError(f"plugin {owner} registered {metric!r}, which is not a kfopt Metric")
        if metric.name in self.metrics:
            raise KfoptError(
                f"Metric name '{metric.name}' is registered twice: by {self.metric_owners[metric.name]} and by {owner}.",
                "uninstall one of the two plugins, or allow only one with KFOPT_PLUGINS.",
            )
        self.metrics[metric.name] = metric
        self.metric_owners[metric.name] = owner

    def metric(self, name: str) -> Metric:
        """The metric called ``name``; a KfoptError listing the valid names otherwise."""
        from kfopt.task import find_metric

        return find_metric(name, self.metrics)

    def _add(self, technique: Technique, owner: str) -> None:
        if not isinstance(technique, Technique):
            raise TypeError(f"plugin {owner} registered {technique!r}, which is not a kfopt Technique")
        for attr in ("name", "kind", "accepts", "produces", "Config"):
            if not getattr(technique, attr, None):
                raise TypeError(f"technique from plugin {owner} does not declare {attr!r}")
        if technique.name in self.techniques:
            raise KfoptError(
                f"Technique name '{technique.name}' is registered twice: by {self.owners[technique.name]} and by {owner}.",
                "uninstall one of the two plugins, or allow only one with KFOPT_PLUGINS.",
            )
        self.techniques[technique.name] = technique
        self.owners[technique.name] = owner

    def get(self, name: str) -> Technique:
        try:
            return self.techniques[name]
        except KeyError:
            raise KfoptError(
                f"Unknown technique '{name}'.{did_you_mean(name, self.techniques)} "
                f"Valid techniques: {', '.join(sorted(self.techniques))}.",
                "use one of those names, or install the plugin that provides it (see `kfopt plugins`).",
            ) from None

    def __iter__(self):
        return iter(sorted(self.techniques.values(), key=lambda t: t.name))


class KfoptPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution each plugin came from."""

    def __init__(self):
        super().__init__("kfopt")
        self.distributions: dict[str, str] = {}


def _owner_of(pm: KfoptPluginManager, plugin) -> str:
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    if name in pm.distributions:
        return pm.distributions[name]
    return "kfopt" if name in DEFAULT_PLUGINS else name


def _allowed() -> set[str] | None:
    value = os.environ.get("KFOPT_PLUGINS", "").strip()
    return {v.strip() for v in value.split(",") if v.strip()} or None


def build_manager(extra_plugins=()) -> KfoptPluginManager:
    """Create a plugin manager with built-ins, entry points (unless disabled) and ``extra_plugins``."""
    pm = KfoptPluginManager()
    pm.add_hookspecs(spec)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if os.environ.get("KFOPT_DISABLE_PLUGIN_AUTOLOAD") != "1":
        _load_entry_points(pm)
    for plugin in extra_plugins:
        if not pm.is_registered(plugin):  # e.g. a test passing a plugin that is also installed
            pm.register(plugin)
    pm.check_pending()
    return pm


def _load_entry_points(pm: KfoptPluginManager) -> None:
    allowed = _allowed()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must never break the CLI
            warnings.warn(
                f"kfopt plugin '{ep.name}' ({ep.value}) failed to import and was skipped: {type(exc).__name__}: {exc}",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            pm.distributions[ep.name] = ep.dist.name


def registry(extra_plugins=()) -> Registry:
    """The techniques available here: built-ins, installed plugins, and ``extra_plugins``."""
    return Registry(build_manager(extra_plugins))

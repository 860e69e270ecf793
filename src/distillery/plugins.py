"""Hydra plugins an override needs, checked before Hydra composes: without the package Hydra
says only "Could not load 'hydra/launcher/joblib'"; this names the extra that installs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

# Hydra plugin configs -> the module that provides them (all three in the `launchers` extra).
PLUGIN_MODULES = {
    "hydra/launcher/joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher/submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher/submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/sweeper/optuna": "hydra_plugins.hydra_optuna_sweeper",
}
INSTALL = 'pip install -e ".[launchers]"'


def _plugin_configs(group: str, name: str, conf_dir: Path) -> list[str]:
    """The plugin configs `group=name` stands for: itself, or what a config of ours in that
    group (conf/hydra/launcher/parallel.yaml, conf/hparams_search/*.yaml) puts in its defaults."""
    found = [f"{group}/{name}"] if f"{group}/{name}" in PLUGIN_MODULES else []
    path = conf_dir / group / f"{name}.yaml"
    if path.is_file():
        try:
            defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        except yaml.YAMLError:
            return found  # Hydra reports a broken file itself
        for entry in defaults:
            if isinstance(entry, str) and f"{group}/{entry}" in PLUGIN_MODULES:
                found.append(f"{group}/{entry}")
            elif isinstance(entry, dict):
                for key, value in entry.items():
                    key = key.removeprefix("override ").strip().lstrip("/")
                    if f"{key}/{value}" in PLUGIN_MODULES:
                        found.append(f"{key}/{value}")
    return found


def missing_plugin(argv: list[str], conf_dir: Path) -> str | None:
    """The message for the first override whose Hydra plugin is not installed, or None."""
    for arg in argv:
        group, sep, name = arg.lstrip("+~").partition("=")
        if not sep or group not in ("hydra/launcher", "hydra/sweeper", "hparams_search"):
            continue
        for config in _plugin_configs(group, name, conf_dir):
            module = PLUGIN_MODULES[config]
            if importlib.util.find_spec(module) is None:
                return (f"{arg} needs the Hydra plugin {module.split('.')[-1].replace('_', '-')} "
                        f"(for '{config}'), which is not installed: {INSTALL}")
    return None


def exit_if_plugin_missing(argv: list[str], conf_dir: Path) -> None:
    problem = missing_plugin(argv, conf_dir)
    if problem:
        import sys

        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

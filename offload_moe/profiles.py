"""Offload profiles: named TOML files in `profiles/` that say how a model should run on a target. The folder stays
at the top of the repository and ships inside the installed package (see `_profile_dir`).

A profile gives engine settings (the EngineOptions fields whose `profile` key is top-level: device, dtype,
expert precision, cache slots per layer, prefetch, eviction policy, context, ...), memory budgets under
[budget] (device, device_reserve, ram) and cost-model rates under [hardware] for the tuner. Every key and
value is checked when the file is read, against the option's own check in `options.py`: a bad one is a
one-line UserError naming the file and the key, before any weight is read. `auto` sizes the cache from the
memory that is free at load (`memory.auto_slots`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .options import DEFAULT_RESERVE, OPTIONS, check_value


def _profile_dir() -> Path:
    """The repository's `profiles/`: inside an installed package at offload_moe/data/profiles (pyproject maps it
    there), else, in a source tree or an editable install, beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "data" / "profiles"
    return installed if installed.is_dir() else package.parent / "profiles"


PROFILE_DIR = _profile_dir()
# profile key -> EngineOptions field, generated from the fields' metadata
ENGINE_KEYS = {f.metadata["profile"] or name: name for name, f in OPTIONS.items()
               if f.metadata["profile"] is not None and "." not in f.metadata["profile"]}
BUDGET_KEYS = {f.metadata["profile"].removeprefix("budget."): name for name, f in OPTIONS.items()
               if (f.metadata["profile"] or "").startswith("budget.")}
OTHER_KEYS = {"description": str, "model": str}  # read by people, not by the engine


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


@dataclass
class Profile:
    name: str
    settings: dict  # EngineOptions fields, checked
    device_budget: int | None = None  # bytes the engine may use on the device
    device_reserve: int = DEFAULT_RESERVE
    ram_budget: int | None = None
    hardware: dict | None = None  # cost-model figures, for the tuner (numbers; measured_on a string)
    auto: bool = False


def load_profile(name_or_path: str) -> Profile:
    if name_or_path == "auto":
        return Profile("auto", {}, auto=True)
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        names = ", ".join(available_profiles() + ["auto"])
        raise UserError(f"unknown profile {name_or_path!r}: give a .toml file or one of {names}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"profile {path} is not valid TOML: {e}") from None
    unknown = set(data) - set(ENGINE_KEYS) - set(OTHER_KEYS) - {"budget", "hardware"}
    if unknown:
        raise UserError(f"profile {path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, kind in OTHER_KEYS.items():
        if key in data and not isinstance(data[key], kind):
            raise UserError(f"profile {path}: {key}: expected a string, got {data[key]!r}")
    settings = {ENGINE_KEYS[k]: check_value(ENGINE_KEYS[k], v, f"profile {path}: {k}")
                for k, v in data.items() if k in ENGINE_KEYS}
    budgets = _budgets(path, _table(path, data, "budget"))
    return Profile(name=path.stem, settings=settings, **budgets, hardware=_hardware(path, data))


def _table(path: Path, data: dict, key: str) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise UserError(f"profile {path}: {key} must be a table ([{key}]), got {table!r}")
    return table


def _budgets(path: Path, budget: dict) -> dict:
    """[budget] device, device_reserve, ram ("auto": 80% of the available RAM) as EngineOptions fields."""
    unknown = set(budget) - set(BUDGET_KEYS)
    if unknown:
        raise UserError(f"profile {path}: unknown key(s) under [budget]: {', '.join(sorted(unknown))} "
                        f"(use {', '.join(BUDGET_KEYS)})")
    out = {}
    for key, name in BUDGET_KEYS.items():
        value = budget.get(key)
        if value is None or (key == "ram" and value == "auto"):
            continue
        out[name] = check_value(name, value, f"profile {path}: budget.{key}")
    return out


def _hardware(path: Path, data: dict) -> dict | None:
    """[hardware]: rates and bandwidths as positive numbers (bytes or weights per second), `measured_on` text."""
    if "hardware" not in data:
        return None
    hw = _table(path, data, "hardware")
    for key, value in hw.items():
        if key == "measured_on":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if not ok:
            want = "a string" if key == "measured_on" else "a positive number (e.g. 25e9)"
            raise UserError(f"profile {path}: hardware.{key}: expected {want}, got {value!r}")
    return hw

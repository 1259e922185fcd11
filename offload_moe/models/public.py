"""The public configs that ship with the package: one hub `config.json` per model in `data/configs/`, named by
its hub repository (`SOURCES.md` there says where each came from), so that `plan --config NAME` and
`calibrate --config NAME` work offline for the models people run."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"


def public_configs() -> dict[str, Path]:
    """Every shipped config, by model name."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def public_config(name: str) -> Path | None:
    """The shipped config of `name` (a model name or a hub id `org/name`, any case), or None."""
    want = name.rsplit("/", 1)[-1].lower()
    return next((p for stem, p in public_configs().items() if stem.lower() == want), None)

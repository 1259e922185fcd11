"""A fresh install works: the wheel ships the profiles and every module, and `.[test]` installs what the tests
import."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from offload_moe.profiles import PROFILE_DIR, available_profiles, load_profile

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPO_PROFILES = sorted(p.stem for p in (ROOT / "profiles").glob("*.toml"))


def test_every_profile_in_the_repository_is_available():
    assert REPO_PROFILES and available_profiles() == REPO_PROFILES
    for name in REPO_PROFILES:
        assert load_profile(name).name == name
    assert PROFILE_DIR.is_dir()


def test_pyproject_maps_profiles_into_the_package():
    setuptools = PYPROJECT["tool"]["setuptools"]
    target = next(pkg for pkg, folder in setuptools["package-dir"].items() if folder == "profiles")
    assert target in setuptools["packages"]
    globs = setuptools["package-data"][target]
    for name in REPO_PROFILES:
        assert any(Path(f"{name}.toml").match(g) for g in globs), name
    # packages is an explicit list (find cannot see the mapped one): it must name every package of the tree
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "offload_moe").rglob("__init__.py")}
    missing = found - set(setuptools["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_the_wheel_holds_every_module_and_profile_and_finds_them_installed(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "offload_moe", src / "offload_moe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "profiles", src / "profiles")
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    r = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = src / "dist" / r.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in REPO_PROFILES:
        assert f"offload_moe/data/profiles/{name}.toml" in names
    for module in (ROOT / "offload_moe").rglob("*.py"):  # subpackages too: `packages` must list each
        assert module.relative_to(ROOT).as_posix() in names
    for demo in ("tiny-moe", "tiny-moe-fine"):
        assert f"offload_moe/data/{demo}/model.safetensors" in names
    for config in (ROOT / "offload_moe" / "data" / "configs").iterdir():  # the public configs `plan` reads by name
        assert config.relative_to(ROOT).as_posix() in names
    assert "offload_moe/formats/cpu_kernels.c" in names  # compiled on first use

    # unpacked as pip would, away from the source tree: the profiles resolve inside the package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import offload_moe.profiles as p; print(p.__file__); print(p.PROFILE_DIR); print(*p.available_profiles())"
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    module_file, profile_dir, profiles = r.stdout.splitlines()
    assert Path(module_file).is_relative_to(site)
    assert Path(profile_dir) == site / "offload_moe" / "data" / "profiles"
    assert profiles.split() == REPO_PROFILES


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _dist_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()


def test_the_test_extra_installs_everything_the_tests_import():
    """What the suite imports (tests, the package's optional imports, scripts the tests run) comes from the
    package's dependencies or its `test` extra, so `pip install -e ".[test]"` on a fresh machine passes."""
    project = PYPROJECT["project"]
    declared = {_dist_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    files = [*(ROOT / "tests").glob("*.py"), *(ROOT / "offload_moe").glob("*.py"), ROOT / "bench" / "gpu_check.py"]
    local = {"offload_moe", "conftest", "train_tiny_moe"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    third_party = set().union(*map(_imported_modules, files)) - set(sys.stdlib_module_names) - local
    owners = packages_distributions()
    missing = {}
    for module in sorted(third_party):
        dists = {_dist_name(d) for d in owners.get(module, [])}
        if not dists & declared:
            missing[module] = sorted(dists) or "not installed"
    assert not missing, f"imported but not in the dependencies or the test extra: {missing}"

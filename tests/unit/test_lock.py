"""requirements.lock agrees with pyproject.toml, covers every transitive dependency, and is what
is installed (the README's commands install with ``-c requirements.lock``)."""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from lock import LOCK, ROOT, normalize, read_lock


def _direct() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**default_environment(), "extra": e}) for e in extras | {""})


def _closure(roots: list[Requirement]) -> set[str]:
    """Names of every distribution that the roots need, from the installed packages' metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(normalize(r.name), frozenset(r.extras)) for r in roots if _applies(r, set())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in md.requires(name) or []:
            req = Requirement(line)
            if _applies(req, set(extras)):
                todo.append((normalize(req.name), frozenset(req.extras)))
    return {name for name, _ in seen}


def test_lock_satisfies_pyproject() -> None:
    pins = read_lock()
    for req in _direct():
        name = normalize(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in {LOCK.name}: run scripts/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {req}: run scripts/lock.py"
        )


def test_lock_is_installed_and_complete() -> None:
    pins = read_lock()
    for name, version in pins.items():
        installed = md.version(name).split("+")[0]
        assert installed == version, f"{name} {installed} is installed, the lock says {version}"
    needed = _closure(_direct())
    assert needed - pins.keys() == set(), "needed but not locked: run scripts/lock.py"
    assert pins.keys() - needed == set(), "locked but not needed: run scripts/lock.py"

"""Print one ``name==version`` pin per ``>=`` lower bound of the runtime dependencies in
``pyproject.toml`` (and of the optional extras named on the command line), for the CI job that
installs the oldest supported versions and runs the numerical CPU tests with them.

    python .ci/min_pins.py            # the runtime dependencies
    python .ci/min_pins.py jax        # ... and the ``jax`` extra's

A requirement without a ``>=`` bound (``torch``) prints nothing: it has no lowest version to check.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# "name[extras] <specifiers> ; marker": the name, then the comma-separated version specifiers
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def lower_bound(requirement: str) -> tuple[str, str | None]:
    """(name, version) of ``requirement``'s ``>=`` bound; version is None where it has none."""
    match = _REQUIREMENT.match(requirement)
    if not match:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, specifiers = match.group(1), match.group(2)
    bounds = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(bounds) > 1:
        raise ValueError(f"{requirement!r} has more than one lower bound")
    return name, (bounds[0] if bounds else None)


def pins(extras: list[str] = ()) -> list[str]:
    """The ``name==version`` pins of the runtime dependencies and of ``extras``, one per package.
    A package listed twice must carry the same lower bound everywhere."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    found: dict[str, str] = {}
    for requirement in requirements:
        name, version = lower_bound(requirement)
        if version is None:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if found.setdefault(key, version) != version:
            raise ValueError(f"{name}: lower bounds {found[key]} and {version} differ")
    return [f"{name}=={version}" for name, version in found.items()]


if __name__ == "__main__":
    print("\n".join(pins(sys.argv[1:])))

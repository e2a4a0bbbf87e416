"""Print pip constraints that pin every package pyproject.toml declares to its lower bound (``name>=X`` ->
``name==X``), for the core and every extra: the README's ``ci:test-oldest`` command installs with them, so the
minimum versions fp8ctx declares are the ones CI runs the suite on.

Usage: ``python .ci/oldest.py > oldest.txt && pip install -c oldest.txt -e ".[test]"``.
Exits 1, naming the package, when a requirement has no lower bound or two requirements bound it differently.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """Each declared package (normalized name) -> its lower bound, from dependencies and every extra.

    Raises:
        ValueError: a requirement is not ``name>=version``, or one package has two different lower bounds.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"{requirement!r}: every requirement must be 'name>=version' (its tested minimum)")
        name, version = re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(2)
        if bounds.setdefault(name, version) != version:
            raise ValueError(f"{name} is bounded twice: >={bounds[name]} and >={version}; declare one minimum")
    return bounds


def main() -> int:
    try:
        bounds = lower_bounds(Path(__file__).resolve().parents[1] / "pyproject.toml")
    except ValueError as error:
        print(f"pyproject.toml: {error}", file=sys.stderr)
        return 1
    print("\n".join(f"{name}=={version}" for name, version in sorted(bounds.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

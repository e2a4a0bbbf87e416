"""The minimum versions pyproject.toml declares are the ones CI installs for the README's ci:test-oldest command
(.ci/oldest.py pins each lower bound), and the README names them as they are."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as CI's
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "oldest.py"


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(text) for text in [*project["dependencies"], *(r for extra in extras for r in extra)]]


def pins() -> dict[str, str]:
    out = subprocess.run([sys.executable, str(SCRIPT)], check=True, capture_output=True, text=True).stdout
    return dict(line.split("==") for line in out.split())


def test_every_declared_requirement_is_pinned_to_its_lower_bound():
    pinned = pins()
    for requirement in declared():
        (spec,) = requirement.specifier  # one bound each: the tested minimum
        assert spec.operator == ">=", requirement
        assert pinned[requirement.name.lower()] == spec.version, requirement
    assert set(pinned) == {r.name.lower() for r in declared()}
    assert pinned["torch"] == "2.6" and "einops" in pinned


def test_the_readme_runs_the_suite_on_those_pins_and_names_each_version():
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- ci:test-oldest -->\n```bash\n(.*)\n", text)
    assert found, "the README lost its ci:test-oldest command"
    command = found.group(1)
    assert "python .ci/oldest.py > .venv/oldest.txt" in command
    assert 'pip install -c .venv/oldest.txt -e ".[test]"' in command and command.endswith("python -m pytest -q")
    assert "test-oldest" in (ROOT / ".ci" / "run").read_text()
    paragraph = " ".join(text[: found.start()].rstrip().rsplit("\n\n", 1)[-1].split())
    for name, version in pins().items():
        assert f"{name} {version}" in paragraph, (name, version)


@pytest.mark.parametrize(
    "requirements, message",
    [
        ('["torch"]', "must be 'name>=version'"),
        ('["torch<3"]', "must be 'name>=version'"),
        ('["torch>=2.6", "Torch>=2.7"]', "torch is bounded twice: >=2.6 and >=2.7"),
    ],
)
def test_a_requirement_without_one_lower_bound_is_refused(tmp_path, requirements, message):
    spec = importlib.util.spec_from_file_location("oldest", SCRIPT)
    oldest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oldest)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f"[project]\ndependencies = {requirements}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        oldest.lower_bounds(pyproject)

"""Packaging: license, typed marker, one version, extras (library open, tests pinned), changelog, README."""

import re
from pathlib import Path

import pytest

import moekit

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]


def test_license_is_an_spdx_expression_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    # an SPDX license string and license-files need setuptools >= 77
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=\s*(\d+)", req).group(1)) >= 77


def test_setuptools_accepts_the_configuration():
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    project = config.read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["version"] == moekit.__version__  # the one version, read from moekit/__init__.py
    assert project["license"] == "Apache-2.0"


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moekit.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", moekit.__version__)


def test_package_is_typed():
    assert (ROOT / "src" / "moekit" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["moekit"]


def test_console_script_and_module_entry():
    assert PROJECT["scripts"] == {"moekit": "moekit.cli:main"}
    assert (ROOT / "src" / "moekit" / "__main__.py").is_file()


def _name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()


def test_test_extra_is_pinned():
    # the suite must not break when an upstream release regresses: every test requirement is exact
    reqs = {_name(r): r for r in EXTRAS["test"]}
    assert all("==" in r for r in reqs.values()), reqs
    assert reqs["transformers"] == "transformers==5.25.0" and reqs["triton"] == "triton==3.6.0"
    assert {"pytest", "pytest-timeout", "matplotlib"} <= set(reqs)
    assert "rich" not in reqs  # nothing uses it


def test_library_extras_stay_open():
    # what moekit itself needs: lower bounds only, so users get the newest releases
    for extra in ("triton", "transformers", "plot"):
        for req in EXTRAS[extra]:
            assert ">=" in req and "==" not in req and "<" not in req.replace("<=", ""), req
    for req in PROJECT["dependencies"]:
        assert "==" not in req and "<" not in req, req


def test_readme_lists_every_extra():
    text = (ROOT / "README.md").read_text()
    table = re.search(r"\| extra \|.*?\n\n", text, re.S)
    assert table, "the README's Quick start has a table of extras"
    for extra in EXTRAS:
        assert f"`{extra}`" in table.group(0), extra


def test_changelog_has_this_version_and_the_unreleased_one():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [0.1.0]" in text and "## [0.2.0] - unreleased" in text
    assert f"## [{moekit.__version__.split('.dev')[0]}]" in text

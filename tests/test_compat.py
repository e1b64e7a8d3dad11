"""The declared dependency ranges are the tested ones: every release pinned in requirements.txt (the set
scripts/test.sh tests) lies inside pyproject.toml's ranges, and the packages whose minor releases have
broken linearize carry an upper bound, so `pip install` cannot pick a release CI has never run
(scripts/test_newest.sh tests the newest one the ranges allow). The behaviour under the installed
transformers is tested in tests/attention/test_wrapper_compat.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).parent.parent
# Bounded above by the newest release scripts/test_newest.sh has run.
BOUNDED = ("transformers", "peft", "datasets", "deepspeed")


def declared() -> dict[str, SpecifierSet]:
    """pyproject.toml's ranges, dependencies and extras, by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [text for extra in project["optional-dependencies"].values() for text in extra]
    return {canonicalize_name(req.name): req.specifier for req in map(Requirement, texts)}


def pinned() -> dict[str, str]:
    """The exact pins (`name==version`) of requirements.txt and requirements-test.txt, by canonical name."""
    pins = {}
    lines = [line for name in ("requirements.txt", "requirements-test.txt")
             for line in (REPO / name).read_text().splitlines()]
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith("-r "):  # the test set includes the core set by reference
            continue
        req = Requirement(text)
        exact = [spec.version for spec in req.specifier if spec.operator == "=="]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    return pins


def test_every_pinned_release_lies_inside_the_declared_range():
    ranges = declared()
    outside = {name: (version, str(ranges[name])) for name, version in pinned().items()
               if name in ranges and not ranges[name].contains(version)}
    assert not outside, f"requirements files pin releases pyproject.toml does not allow: {outside}"


def test_the_packages_that_break_in_minor_releases_are_bounded_below_the_next_major():
    """`transformers<6` would let 5.25 in untested; `<5.25` (same major as the pin) would not."""
    ranges = declared()
    pins = pinned()
    for name in BOUNDED:
        assert name in pins, f"{name} is pinned in neither requirements file, so scripts/test.sh does not test it"
        major = Version(pins[name]).release[0]
        caps = [spec for spec in ranges[name]
                if spec.operator in ("<", "<=") and Version(spec.version).release[0] == major]
        assert caps, f"{name}{ranges[name]} allows minor releases CI has never run"

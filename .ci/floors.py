"""Print pip constraints pinning every dependency in pyproject.toml to its floor (``>=X`` -> ``==X``).

pip has no "lowest versions" resolver, so ``make test-min`` installs with these constraints instead: the
package, its extras and the test tools then come in at the oldest versions pyproject.toml admits, and the
tests show whether those floors are true. A package named with ``--keep NAME==VERSION`` (the local torch
build) is pinned to that version instead, after checking that its floor admits it. Constraints on
packages that are not installed are ignored by pip, so every extra's floors are listed.

    python .ci/floors.py --keep torch==2.13.0 > floors.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

# "name[extras] >=1.2, <3 ; marker": the name and the lower bound, if there is one.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")
FLOOR = re.compile(r">=\s*([0-9][0-9a-zA-Z.+!-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("2.13.0+cpu" -> (2, 13, 0)), enough to compare plain floors."""
    return tuple(int(part) for part in re.match(r"[0-9]+(?:\.[0-9]+)*", version).group(0).split("."))


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    self_name = canonical(project["name"])
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    found: dict[str, str] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"floors.py: cannot read the requirement {requirement!r}")
        name, specifier = canonical(match.group(1)), match.group(2)
        if name == self_name:
            continue
        floor = FLOOR.search(specifier)
        if floor is None:
            continue
        if name in found and found[name] != floor.group(1):
            raise SystemExit(f"floors.py: {name} has two floors, {found[name]} and {floor.group(1)}")
        found[name] = floor.group(1)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--pyproject", type=Path, default=root / "pyproject.toml")
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="pin NAME to VERSION instead of its floor (the floor must admit it)",
    )
    args = parser.parse_args(argv)
    pins = floors(args.pyproject)
    for keep in args.keep:
        name, sep, version = keep.partition("==")
        name = canonical(name.strip())
        if not sep or not version.strip():
            raise SystemExit(f"floors.py: --keep wants NAME==VERSION, not {keep!r}")
        version = version.strip()
        if name in pins and release(version) < release(pins[name]):
            raise SystemExit(f"floors.py: {name}=={version} is below its floor {pins[name]} (pyproject.toml)")
        pins[name] = version
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

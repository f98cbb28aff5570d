"""The Dockerfiles, read without a Docker engine: each image installs exactly its dependency group from
pyproject.toml (with pyproject's version bounds), on the Python pyproject requires, as a non-root
user, and the trainer's entrypoint is the launcher."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGES = {"operator": REPO / "images" / "operator" / "Dockerfile", "trainer": REPO / "images" / "trainer" / "Dockerfile"}
VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--target", "--prefix", "--root"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out, buffer = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        op, _, rest = (buffer + stripped).partition(" ")
        out.append((op.upper(), rest.strip()))
        buffer = ""
    return out


def args_of(path: Path, op: str) -> list[str]:
    return [rest for name, rest in instructions(path) if name == op]


def base_image(path: Path) -> str:
    args = dict(a.split("=", 1) for a in args_of(path, "ARG") if "=" in a)
    image = args_of(path, "FROM")[-1].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)


def commands(path: Path) -> list[list[str]]:
    """Every shell command of every RUN, split on &&, || and ;."""
    out: list[list[str]] = []
    for run in args_of(path, "RUN"):
        current: list[str] = []
        for token in shlex.split(run):
            if token in ("&&", "||", ";"):
                out.append(current)
                current = []
            else:
                current.append(token.rstrip(";"))
        out.append(current)
    return [c for c in out if c]


def pip_targets(path: Path) -> list[str]:
    targets = []
    for cmd in commands(path):
        names = [Path(t).name for t in cmd]
        if "install" not in cmd or not any(n in ("pip", "pip3") for n in names):
            continue
        rest = cmd[cmd.index("install") + 1:]
        assert not {"-r", "--requirement", "-c", "--constraint", "-e", "--editable"} & set(rest), cmd
        skip = False
        for token in rest:
            if skip:
                skip = False
            elif token in VALUE_OPTIONS:
                skip = True
            elif not token.startswith("-"):
                targets.append(token)
    return targets


def requirements(targets: list[str]) -> dict[str, SpecifierSet]:
    """Package name -> version bounds of what the targets install (`.[group]` expands from pyproject)."""
    reqs: list[str] = []
    for target in targets:
        local = re.fullmatch(r"\.\[([\w,-]+)\]", target)
        if local:
            reqs += PYPROJECT["project"]["dependencies"]
            for group in local.group(1).split(","):
                reqs += PYPROJECT["project"]["optional-dependencies"][group]
        else:
            reqs.append(target)
    parsed = [Requirement(r) for r in reqs]
    return {canonicalize_name(r.name): r.specifier for r in parsed}


def uid(path: Path) -> int:
    user = args_of(path, "USER")[-1].split(":")[0]
    if user.isdigit():
        return int(user)
    for cmd in commands(path):
        if cmd[0] == "useradd" and cmd[-1] == user:
            return int(cmd[cmd.index("--uid") + 1])
    raise AssertionError(f"USER {user} is neither numeric nor created with useradd --uid")


def env(path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for rest in args_of(path, "ENV") for item in shlex.split(rest))


@pytest.mark.parametrize("group", IMAGES)
def test_image_installs_exactly_its_group_with_pyprojects_bounds(group):
    installed = requirements(pip_targets(IMAGES[group]))
    expected = {canonicalize_name(Requirement(r).name): Requirement(r).specifier
                for r in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"][group]}
    assert installed == expected
    assert pip_targets(IMAGES[group]) == [f".[{group}]"]


@pytest.mark.parametrize("group", IMAGES)
def test_image_copies_what_the_wheel_build_needs_and_dockerignore_keeps_it(group):
    sources = {s for rest in args_of(IMAGES[group], "COPY") for s in shlex.split(rest)[:-1]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= {p.split("/")[0] for p in PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]}
    assert needed <= sources
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert not needed & ignored


@pytest.mark.parametrize("group", IMAGES)
def test_image_runs_as_a_non_root_user(group):
    assert uid(IMAGES[group]) == 10001


def test_images_run_the_python_pyproject_requires():
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    operator_base = base_image(IMAGES["operator"])
    assert operator_base == "python:3.11-slim"
    assert requires.contains(operator_base.split(":")[1].split("-")[0] + ".0")
    trainer_base = base_image(IMAGES["trainer"])
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-(runtime|devel)-ubuntu22\.04", trainer_base)
    venv = [c for c in commands(IMAGES["trainer"]) if c[1:3] == ["-m", "venv"]]
    assert venv and venv[0][0] == "python3.11" and requires.contains("3.11.0")
    assert env(IMAGES["trainer"])["PATH"].startswith(venv[0][3] + "/bin:")


def test_entrypoints():
    def entrypoint(path: Path) -> list[str]:
        return json.loads(args_of(path, "ENTRYPOINT")[-1])

    assert entrypoint(IMAGES["trainer"]) == ["python", "-m", "dhad_trainer", "launch", "/etc/dhad/job.json"]
    assert entrypoint(IMAGES["operator"]) == ["python", "-m", "dhad_operator"]
    assert env(IMAGES["trainer"])["TORCH_EXTENSIONS_DIR"].startswith("/tmp/")

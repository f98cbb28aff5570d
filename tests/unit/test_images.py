"""The Dockerfiles, read without a Docker engine: each image installs exactly its dependency groups from
pyproject.toml (with pyproject's version bounds) in its final stage, on the Python pyproject requires, as
a non-root user, and the trainer's entrypoint is the launcher. Every feature the GPU examples use comes
from the trainer image's groups, and no op is left for nvcc at run time."""

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
IMAGE_GROUPS = {"operator": ("operator",), "trainer": ("trainer", "gpu")}
VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--target", "--prefix", "--root",
                 "--only-binary", "--no-binary", "-w", "--wheel-dir"}


def instructions(path: Path, final_stage: bool = False) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined; `final_stage`
    keeps only what follows the last FROM (the image that ships; earlier stages only build)."""
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
    if final_stage:
        last = max(i for i, (op, _) in enumerate(out) if op == "FROM")
        out = out[last:]
    return out


def args_of(path: Path, op: str, final_stage: bool = False) -> list[str]:
    return [rest for name, rest in instructions(path, final_stage) if name == op]


def base_image(path: Path) -> str:
    args = dict(a.split("=", 1) for a in args_of(path, "ARG") if "=" in a)
    image = args_of(path, "FROM")[-1].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)


def commands(path: Path, final_stage: bool = True) -> list[list[str]]:
    """Every shell command of every RUN (of the final stage), split on &&, || and ;."""
    out: list[list[str]] = []
    for run in args_of(path, "RUN", final_stage):
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


def group_requirements(groups) -> dict[str, SpecifierSet]:
    reqs = PYPROJECT["project"]["dependencies"] + [r for g in groups for r in PYPROJECT["project"]["optional-dependencies"][g]]
    return {canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in reqs}


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_exactly_its_groups_with_pyprojects_bounds(image):
    installed = requirements(pip_targets(IMAGES[image]))
    assert installed == group_requirements(IMAGE_GROUPS[image])
    assert pip_targets(IMAGES[image]) == [f".[{','.join(IMAGE_GROUPS[image])}]"]


def transitive(names: set[str]) -> set[str]:
    """Names plus what their installed distributions require (what pip would bring), where installed here."""
    from importlib import metadata

    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r).name for r in requires if "extra ==" not in r]
    return seen


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_feature_of_the_gpu_examples_comes_with_the_trainer_image(path):
    from dhad_api.jobs import stages_for
    from dhad_trainer.runtime.preflight import packages_needed
    from tests.support.examples import example_jobs

    jobs = [(kind, spec) for _, kind, spec in example_jobs(path)]  # a Pipeline: every stage's and gate's job
    provided = transitive(set(requirements(pip_targets(IMAGES["trainer"]))))
    needed = {name: why for kind, spec in jobs for name, why in packages_needed(spec, stages_for(kind, spec)).items()}
    missing = {name: why for name, why in needed.items() if canonicalize_name(name) not in provided}
    assert not missing, f"{path.name} uses features the trainer image does not install: {missing}"
    if path.stem in ("acegpt-7b-rlaif-grpo", "acegpt-7b-pipeline"):  # the pipeline's RLAIF stage is that GRPO job
        assert "vllm" in needed  # the example that broke: useVllm with vLLM in no group


def test_flash_attn_is_built_in_a_devel_stage_and_installed_as_a_wheel():
    """No nvcc at run time: the runtime base has none, so flash-attn's kernels are compiled in the devel stage."""
    first = instructions(IMAGES["trainer"])
    froms = [rest for op, rest in first if op == "FROM"]
    args = dict(a.split("=", 1) for a in args_of(IMAGES["trainer"], "ARG") if "=" in a)
    assert len(froms) == 2 and "devel" in args[froms[0].split()[0].strip("${}")] and "runtime" in base_image(IMAGES["trainer"])
    built = " ".join(args_of(IMAGES["trainer"], "RUN")[:3])
    assert "pip wheel --no-build-isolation" in built and "flash-attn" in built
    final = " ".join(args_of(IMAGES["trainer"], "RUN", final_stage=True))
    assert "--only-binary flash-attn" in final and "--find-links /wheels" in final


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

"""The package as a user installs it: the built wheel (not the editable install the suite runs on) in a fresh venv.

An editable install hides a wheel that misses a subpackage and an import nobody declared: both shipped once. So
this builds the sdist and the wheel, checks that every module of the source tree is in them under the one
namespace, installs the wheel into a new venv with pip resolving the declared dependencies, and runs the README's
commands from a directory that holds the user's own train.py, cache.py and pipeline.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "kd_pipeline"


def source_modules() -> set[str]:
    """Every module the package holds, as paths inside the namespace (``kd_pipeline/cache/build.py``)."""
    found = {f"{NAMESPACE}/{p.name}" for p in REPO.glob("*.py") if p.name != "setup.py"}
    for folder in ("cache", "train"):
        found |= {f"{NAMESPACE}/{p.relative_to(REPO).as_posix()}" for p in (REPO / folder).rglob("*.py")}
    return found


def imported_distributions() -> dict[str, set[str]]:
    """Third-party distributions the package's modules import (top-level names mapped through the installed
    metadata), each with the modules that import it."""
    dists = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for module in source_modules():
        path = REPO / module.removeprefix(f"{NAMESPACE}/")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == NAMESPACE:
                    continue
                for dist in dists.get(top, [top]):
                    found.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    return found


def declared() -> dict[str, set[str]]:
    """Distribution name -> the extras that declare it ("" for the core dependencies)."""
    out: dict[str, set[str]] = {}
    for req in metadata.requires("kd-pipeline") or []:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        extra = req.split("extra ==")[1].strip().strip("'\"") if "extra ==" in req else ""
        out.setdefault(name.lower().replace("_", "-"), set()).add(extra)
    return out


# Imported only behind an optional extra's feature, each with the extra that declares it.
OPTIONAL = {
    "vllm": "vllm",
    "matplotlib": "plot",
    "peft": "peft",
    "wandb": "wandb",
    "mlflow-skinny": "mlflow",
    "tensorboard": "tensorboard",
}


def test_every_direct_import_is_a_declared_dependency():
    deps = declared()
    for dist, modules in sorted(imported_distributions().items()):
        if dist in OPTIONAL:
            assert OPTIONAL[dist] in deps.get(dist, set()), f"{dist} (imported by {sorted(modules)}) is in no extra"
            continue
        assert "" in deps.get(dist, set()), f"{dist} is imported by {sorted(modules)} but not a declared dependency"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_the_wheel_holds_every_module_under_one_name(built):
    (wheel,) = built.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {NAMESPACE}, tops
    missing = source_modules() - set(names)
    assert not missing, f"the wheel lacks {sorted(missing)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert f"pipeline = {NAMESPACE}.pipeline:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_sdist_holds_the_source_tree(built):
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {m.removeprefix(f"{NAMESPACE}/") for m in source_modules()} | {"setup.py", "pyproject.toml", "README.md"}
    assert not expected - names, f"the sdist lacks {sorted(expected - names)}"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_pipeline_in_a_user_project(
    built, tmp_path, teacher_dir, corpus_jsonl, student_config
):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first, pinned: the CPU wheel on this machine's disk; the wheel's range then installs nothing more.
    torch_pin = f"torch=={metadata.version('torch').split('+')[0]}"
    subprocess.run([*pip, torch_pin], check=True, timeout=900, capture_output=True)
    (wheel,) = built.glob("*.whl")
    result = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    project = tmp_path / "user_project"  # the names a user's ML project commonly has
    project.mkdir()
    for name in ("train.py", "cache.py", "pipeline.py"):
        (project / name).write_text("raise SystemExit('the user\\'s own %s was imported' % __file__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    bin_ = venv / "bin"

    def run(*args: str, module: bool = False) -> str:
        cmd = [str(bin_ / "python"), "-m", NAMESPACE, *args] if module else [str(bin_ / "pipeline"), *args]
        done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "the user's own" not in done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "cache-teacher" in run("--help") and "distill" in run("--help", module=True)
    python = [str(bin_ / "python"), "-c"]
    where = subprocess.run(
        [*python, f"import {NAMESPACE}; print({NAMESPACE}.__file__)"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy, not this checkout
    cache, out = tmp_path / "cache", tmp_path / "run"
    run(
        "cache-teacher", "--teacher", str(teacher_dir), "--data", str(corpus_jsonl), "--out", str(cache),
        "--top-k", "8", "--seq-len", "32", "--max-sequences", "24", "--no-progress",
    )  # fmt: skip
    assert "OK:" in run("verify", str(cache), module=True)
    summary = run(
        "distill", "--student", str(student_config), "--cache", str(cache), "--out", str(out), "--max-steps", "2",
        "--batch-size", "4", "--eval-sequences", "4", "--no-progress",
    )  # fmt: skip
    assert "done: 2 steps" in summary and (out / "final" / "config.json").exists()
    rows = subprocess.run(
        [*python, f"from {NAMESPACE} import read_all; print(read_all({str(cache)!r}).num_rows)"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rows.stdout.strip() == "24", rows.stderr[-2000:]

"""`pip install` gives the entry module, its package, the console script and one extra per use, each pinning what
its requirements file pins (builds the wheel and reads it; the demo through the installed console script runs in
tests/test_end_to_end.py::test_demo, a stop through it in tests/test_signals.py); `make pyz` gives one file that
runs the demo from any folder."""

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, assert_phase_keys, clean_env, run_tool

EXTRAS = {"cpu": ["requirements-cpu.txt", "requirements-torch.txt"], "tpu": ["requirements-tpu.txt"],
          "torch": ["requirements-torch.txt"], "test": ["requirements-test.txt"], "plot": ["requirements-plot.txt"],
          "wandb": ["requirements-wandb.txt"]}
REQUIREMENT_FILES = sorted({name for names in EXTRAS.values() for name in names})


def requirement_lines(names: list[str]) -> list[str]:
    lines = (line.split("#")[0].strip() for name in names for line in open(os.path.join(ROOT, name)))
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Built from a copy of what pyproject.toml names (setuptools writes build/ beside the sources)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ["pyproject.toml", "README.md", "run_param_swap.py", *REQUIREMENT_FILES]:
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "param_swap"), src / "param_swap", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(src)], capture_output=True, text=True, timeout=300,
                          cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("run_param_swap-*.whl")
    return zipfile.ZipFile(path)


def dist_file(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/" + name)]
    return wheel.read(path).decode()


def package_files() -> list[str]:
    return sorted(f"param_swap/{n}" for n in os.listdir(os.path.join(ROOT, "param_swap")) if n.endswith(".py"))


def test_the_wheel_holds_the_entry_and_its_package_and_nothing_else_of_the_repo(wheel):
    code = sorted(n for n in wheel.namelist() if ".dist-info/" not in n)
    assert code == sorted(["run_param_swap.py", *package_files()])
    for name in code:
        assert wheel.read(name) == open(os.path.join(ROOT, name), "rb").read(), name


def test_the_console_script_is_cli(wheel):
    entry_points = dist_file(wheel, "entry_points.txt")
    assert "[console_scripts]\nrun-param-swap = run_param_swap:cli" in entry_points
    import run_param_swap as rps

    assert rps.CONSOLE_SCRIPT == "run-param-swap" and callable(rps.cli)


def test_each_extra_pins_what_its_requirements_file_pins(wheel):
    meta = email.parser.Parser().parsestr(dist_file(wheel, "METADATA"))
    assert sorted(meta.get_all("Provides-Extra")) == sorted(EXTRAS)
    requires = meta.get_all("Requires-Dist")
    for extra, names in EXTRAS.items():
        marker = f'; extra == "{extra}"'
        pinned = sorted(r.removesuffix(marker).replace(" ", "") for r in requires if r.endswith(marker))
        assert pinned == sorted(line.replace(" ", "") for line in requirement_lines(names)), extra
    assert sorted(r for r in requires if "extra ==" not in r) == ["numpy", "safetensors"]
    assert meta["Requires-Python"] == ">=3.12"


def test_the_api_imports_from_another_folder_without_path_edits(tmp_path):
    """The installed module (make setup installs it editable), not a file next to the caller."""
    proc = subprocess.run([sys.executable, "-c", "import run_param_swap as r; print(r.__file__, r.ParamSwapper)"],
                          capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == os.path.join(ROOT, "run_param_swap.py")


@pytest.mark.engine
def test_the_pyz_runs_the_demo_from_another_folder(tmp_path):
    """make pyz: the one file to copy to a TPU VM, run with the environment's Python from any folder, prints the
    demo's phase lines with the keys they always had."""
    proc = subprocess.run(["make", "-s", "pyz"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pyz = os.path.join(ROOT, "dist", "run_param_swap.pyz")
    with zipfile.ZipFile(pyz) as z:
        files = sorted(n for n in z.namelist() if not n.endswith("/"))  # folders are entries of their own
        assert files == sorted(["__main__.py", "run_param_swap.py", *package_files()])
    run = run_tool("--demo", script=pyz, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_phase_keys(run, "demo")


def test_the_entry_keeps_its_public_names():
    """`import run_param_swap` gives what docs/api.md and RL codebases use, each the package's own object."""
    import run_param_swap as rps
    from param_swap import checkpoint, hosts, sglang_adapter, swapper

    assert {"ParamSwapper", "start_engine", "load_mllm_params", "HOSTS", "ToolError", "cli"} <= set(rps.__all__)
    assert all(hasattr(rps, name) for name in rps.__all__)
    assert (rps.ParamSwapper, rps.start_engine, rps.load_mllm_params, rps.HOSTS) == (
        swapper.ParamSwapper, sglang_adapter.start_engine, checkpoint.load_mllm_params, hosts.HOSTS)

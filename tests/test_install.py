"""Installing: the README's quick start is the two lines CI runs; `pip install .` without
torch (isolated, editable, wheel) and a build without a C++ compiler stop with one line
that says what to run; `DBX_SKIP_EXT=1 pip install .` gives a working pure-PyTorch
install that says so; one version number everywhere; the build report's fields in the
compiled and the fallback install.

The fresh-venv tests install from the package registries (as the README's lines do) and
take about two minutes, so they run once, in the pass with the compiled kernels."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import diffusionblocks
import diffusionblocks_ext as dx
from diffusionblocks_ext import _loader, build_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import quickstart  # noqa: E402

FRESH_VENVS = pytest.mark.skipif(
    os.environ.get("DBX_DISABLE_EXT", "") not in ("", "0"),
    reason="packaging is tested once, in the pass with the compiled kernels")
STOP_LINE = re.compile(r"^\s*diffusionblocks: cannot build: ", re.M)
REPORT_FIELDS = {"diffusionblocks_ext", "python", "platform", "torch", "torch_cuda", "cpu", "cpu_features",
                 "torch_cpu_capability", "gpus", "extension", "module", "backend_cpu", "backend_cuda", "build",
                 "threads_kernels", "threads_torch", "environment", "problems"}
BUILD_FIELDS = {"version", "torch", "cpu_flags", "cuda_kernels", "cuda_archs", "cuda_toolkit", "compiler", "openmp",
                "build_options"}


def run(command, cwd, env=None, timeout=900):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(**extra):
    """The environment without our run-time switches, so each case sets exactly what it tests."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("DBX_") and name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


# --- the README's quick start ----------------------------------------------------------------------

def test_quickstart_is_two_lines_that_install_run_and_test():
    lines = quickstart.commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(lines) == 2, lines
    setup_and_run, tests = lines
    assert re.search(r"pip install torch==\d+\.\d+\.\d+ ", setup_and_run)
    assert "pip install --no-build-isolation ." in setup_and_run
    assert setup_and_run.endswith("&& diffusionblocks train")
    assert tests == "pip install -r requirements-dev.txt && pytest"
    # the command setup.py's one-line stop gives is the README's
    told = re.search(r'INSTALL_COMMAND = "([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert setup_and_run == f"{told} && diffusionblocks train"
    # CI runs what the README says, read by the same script
    assert "scripts/quickstart.py" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_reader_refuses_a_readme_without_the_block():
    with pytest.raises(SystemExit, match="no '## Quick start' heading"):
        quickstart.commands("# A\n\n## Other\n```bash\nls\n```\n")
    with pytest.raises(SystemExit, match="no ```bash block"):
        quickstart.commands("# A\n\n## Quick start\n\ntext only\n\n## Next\n```bash\nls\n```\n")


# --- one version ------------------------------------------------------------------------------------

def test_one_version_number_everywhere():
    version = dx.__version__
    assert diffusionblocks.__version__ == version
    assert importlib.metadata.version("diffusionblocks") == version  # the wheel's metadata
    cli = run([sys.executable, "-m", "diffusionblocks", "--version"], cwd="/")
    assert cli.returncode == 0 and cli.stdout.strip() == f"diffusionblocks {version}"
    if dx.HAS_EXT:
        assert dx.ops._C.__version__ == version and dx.ops._C.build_info()["version"] == version
    # the build files read _version.py instead of repeating the number
    assert version not in (ROOT / "setup.py").read_text()
    assert version not in (ROOT / "CMakeLists.txt").read_text()


# --- the build report -------------------------------------------------------------------------------

def test_build_report_fields_in_this_install():
    out = run([sys.executable, "-m", "diffusionblocks_ext", "--json"], cwd="/")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info) == REPORT_FIELDS
    assert info["diffusionblocks_ext"] == dx.__version__ and info["torch"] == torch.__version__
    assert info["threads_torch"] >= 1 and isinstance(info["cpu_features"], list)
    if dx.HAS_EXT:
        assert info["extension"] == "loaded" and info["backend_cpu"] == "ext-cpu"
        assert Path(info["module"]).exists() and info["threads_kernels"] >= 1
        build = info["build"]
        assert set(build) == BUILD_FIELDS
        assert build["version"] == dx.__version__ and build["torch"] == torch.__version__
        assert build["cpu_flags"] and build["compiler"] and build["openmp"] > 0
        assert build["cuda_kernels"] == dx.HAS_CUDA_KERNELS
        assert bool(build["cuda_archs"]) == build["cuda_kernels"] == bool(build["cuda_toolkit"])
        assert info["backend_cuda"] == ("ext-cuda" if dx.HAS_CUDA_KERNELS else "reference")
        assert info["problems"] == []
    else:
        assert info["build"] is None and info["module"] is None and info["threads_kernels"] is None
        assert info["backend_cpu"] == info["backend_cuda"] == "reference"
        assert info["extension"] == _loader.STATUS
    text = run([sys.executable, "-m", "diffusionblocks_ext"], cwd="/").stdout
    for label in ("diffusionblocks_ext", "python", "platform", "torch", "cpu", "gpus", "compiled extension",
                  "module file", "CPU tensors", "CUDA tensors", "threads"):
        assert re.search(rf"^{label}\s", text, re.M), (label, text)
    assert re.search(r"^env DBX_", text, re.M), text
    if dx.HAS_EXT:
        for label in ("built version", "built against torch", "built for CPU", "CUDA kernels", "compiler",
                      "OpenMP", "build options"):
            assert re.search(rf"^{label}\s", text, re.M), (label, text)


def test_build_report_names_what_each_variable_changed():
    env = clean_env(DBX_DISABLE_EXT="1", DBX_PORTABLE="1", DBX_SKIP_EXT="0", DBX_TYPO="1")
    info = json.loads(run([sys.executable, "-m", "diffusionblocks_ext", "--json"], cwd="/", env=env).stdout)
    effects = info["environment"]["dbx"]
    assert info["extension"] == "disabled by DBX_DISABLE_EXT=1" and info["backend_cpu"] == "reference"
    assert "the reference serves every op" in effects["DBX_DISABLE_EXT"]
    assert "acts when building, none on this run" in effects["DBX_PORTABLE"]
    assert "off" in effects["DBX_SKIP_EXT"]
    assert "not a variable this package reads" in effects["DBX_TYPO"]


def test_diffusionblocks_info_adds_the_trainer_side():
    out = run([sys.executable, "-m", "diffusionblocks", "info", "--json"], cwd="/")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert REPORT_FIELDS <= set(info) and info["diffusionblocks"] == dx.__version__
    assert info["data_cache"] and info["model_cache"]
    text = run([sys.executable, "-m", "diffusionblocks", "info"], cwd="/").stdout
    assert text.startswith(f"diffusionblocks      {dx.__version__}\n") and "data cache" in text


@pytest.mark.skipif(not any(Path(dx.__file__).parent.glob("_C.*")), reason="needs the compiled module on disk")
def test_loader_tells_a_module_built_for_another_torch():
    why = _loader._why_not(ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDevice"))
    assert "built against another torch" in why and torch.__version__ in why and _loader.REBUILD in why


def test_loader_names_a_module_that_loads_but_does_not_match():
    from types import SimpleNamespace

    def module(version=dx.__version__, torch_built=torch.__version__, info=True):
        built = {"torch": torch_built}
        return SimpleNamespace(__version__=version, **({"build_info": lambda: built} if info else {}))

    assert _loader._mismatch(module()) == ""
    assert _loader._mismatch(module(torch_built=torch.__version__.split("+")[0] + "+cu130")) == ""
    assert "built for version 0.0.1, not" in _loader._mismatch(module(version="0.0.1"))
    assert "from a build older than" in _loader._mismatch(module(info=False))
    other = _loader._mismatch(module(torch_built="1.13.0"))
    assert f"built against torch 1.13.0 while torch {torch.__version__} runs" in other and _loader.REBUILD in other


# --- fresh venvs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the checkout's files (what git tracks or would), so builds leave the tree alone."""
    target = tmp_path_factory.mktemp("source")
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("needs a git checkout to copy the sources from")
    for name in filter(None, listed.stdout.split("\0")):
        path = ROOT / name
        if path.is_file() and not name.startswith("results/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)
    return target


def make_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin"


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("venv-without-torch"))


@FRESH_VENVS
@pytest.mark.parametrize("command", [["install", "."], ["install", "-e", "."], ["wheel", "--no-deps", "."]],
                         ids=["install", "editable", "wheel"])
def test_pip_without_torch_stops_with_one_line(source, without_torch, command, tmp_path):
    out = run([str(without_torch / "pip"), *command, "--no-cache-dir", "--wheel-dir", str(tmp_path)]
              if command[0] == "wheel" else [str(without_torch / "pip"), *command], cwd=source, env=clean_env())
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert len(STOP_LINE.findall(text)) == 1, text
    assert "torch is not importable" in text and "pip install --no-build-isolation ." in text
    assert "DBX_SKIP_EXT=1 pip install ." in text
    assert "Traceback" not in text, text
    assert not list(source.rglob("*.so")), "nothing may be compiled"


@pytest.fixture(scope="module")
def reference_install(source, tmp_path_factory):
    """A fresh venv with the CPU torch we test with, then `DBX_SKIP_EXT=1 pip install .`."""
    if "+cpu" not in torch.__version__:
        pytest.skip("installs a second torch: only done with the CPU build (a CUDA one is several GB)")
    bin_dir = make_venv(tmp_path_factory.mktemp("venv-reference"))
    for command in ([str(bin_dir / "pip"), "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "wheel"],
                    [str(bin_dir / "pip"), "install", "-q", "."]):
        out = run(command, cwd=source, env=clean_env(DBX_SKIP_EXT="1"))
        assert out.returncode == 0, out.stdout + out.stderr
    return bin_dir


@FRESH_VENVS
def test_no_compiler_stops_with_one_line(source, reference_install):
    out = run([str(reference_install / "pip"), "install", "--no-build-isolation", "--no-deps", "."], cwd=source,
              env=clean_env(CXX="dbx-no-such-compiler"))
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert len(STOP_LINE.findall(text)) == 1 and "no C++ compiler `dbx-no-such-compiler`" in text, text
    assert "Traceback" not in text, text


@FRESH_VENVS
def test_skip_ext_install_works_and_says_so(reference_install, tmp_path):
    python = str(reference_install / "python")
    check = ("import torch, diffusionblocks_ext as dx\n"
             "F, z, s = torch.randn(4, 5), torch.randn(4, 5), torch.rand(4) + 0.1\n"
             "expected = dx.c_skip(s)[:, None] * z + dx.c_out(s)[:, None] * F\n"
             "assert not dx.HAS_EXT and dx.backend(F) == 'reference'\n"
             "assert torch.allclose(dx.denoise(F, z, s), expected)\n"
             "print(dx.__file__)")
    out = run([python, "-c", check], cwd=tmp_path, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(reference_install.parent)), "the installed copy, not the checkout"
    assert "RuntimeWarning: this install has no compiled extension (built with DBX_SKIP_EXT=1" in out.stderr
    required = run([python, "-c", "import diffusionblocks_ext"], cwd=tmp_path, env=clean_env(DBX_REQUIRE_EXT="1"))
    assert required.returncode != 0 and "DBX_REQUIRE_EXT=1 but this install has no compiled extension" in \
        required.stderr
    version = run([str(reference_install / "diffusionblocks"), "--version"], cwd=tmp_path, env=clean_env())
    assert version.stdout.strip() == f"diffusionblocks {dx.__version__}"
    report = run([python, "-m", "diffusionblocks_ext", "--json"], cwd=tmp_path, env=clean_env())
    info = json.loads(report.stdout)
    assert set(info) == REPORT_FIELDS and info["build"] is None and info["backend_cpu"] == "reference"
    assert info["extension"].startswith("this install has no compiled extension")
    assert info["problems"] == [info["extension"]]
    trained = run([str(reference_install / "diffusionblocks"), "train", "vit-digits-tiny", "--out", "run"],
                  cwd=tmp_path, env=clean_env())
    assert trained.returncode == 0, trained.stderr
    assert "test_accuracy" in json.loads((tmp_path / "run" / "report.json").read_text())["metrics"]

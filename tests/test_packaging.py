"""What installing minillm puts into an environment, and the pins it is tested with.

minillm owns one import name, `minillm`. Its Triton ops and benchmarks sit at the repository's
top (kernels/, benchmarks/) and are imported as `minillm.kernels` and `minillm.benchmarks`.
`kernels` is Hugging Face's name (transformers >= 5.25 imports it), so neither folder may ever
be found as a top-level package, from the repository's root or from anywhere else.
"""
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# Imports our ops, then transformers' BERT (which imports Hugging Face's `kernels` where it is
# installed), in one process; prints where each came from.
BOTH = """
import importlib.util, json, sys
import minillm.kernels.flash_attention as fa
import minillm.kernels.launch as launch
import minillm.benchmarks.timing as timing
from transformers import BertModel
hf = importlib.util.find_spec("kernels")
print(json.dumps({"ops": [fa.__file__, launch.__file__, timing.__file__], "bert": BertModel.__name__,
                  "kernels": hf.origin if hf else None}))
"""


def run_python(code, cwd, env_extra=None, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    proc = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def inside(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_our_ops_and_transformers_in_one_process(where, tmp_path):
    pytest.importorskip("transformers")  # the test extra has it
    cwd = ROOT if where == "root" else tmp_path
    seen = json.loads(run_python(BOTH, cwd).splitlines()[-1])
    assert seen["bert"] == "BertModel"
    flash, launch, bench = (Path(p).resolve() for p in seen["ops"])
    assert flash.parent == launch.parent == ROOT / "kernels" and bench.parent == ROOT / "benchmarks", seen["ops"]
    # Whatever `kernels` is here (Hugging Face's, or nothing), it is never this repository's folder.
    assert seen["kernels"] is None or not inside(seen["kernels"], ROOT / "kernels"), seen["kernels"]


def test_the_test_environment_has_hugging_faces_kernels():
    """The test above meets the collision only where Hugging Face's `kernels` is installed:
    transformers >= 5.25 requires it, and the pinned environment (constraints.txt) has both."""
    pytest.importorskip("transformers")
    if Version(importlib.metadata.version("transformers")) < Version("5.25"):
        pytest.skip("transformers < 5.25 does not bring Hugging Face's kernels")
    assert "kernels" in {Requirement(r).name for r in importlib.metadata.requires("transformers") or []
                         if "extra ==" not in r}
    hf = importlib.metadata.distribution("kernels")
    assert any(f.name == "__init__.py" and f.parts[0] == "kernels" for f in hf.files), "not a `kernels` package"


def test_another_packages_kernels_wins_even_from_the_root(tmp_path):
    """Any installed top-level `kernels` (here a stand-in placed after the repository's root on
    sys.path, as site-packages is) is the one `import kernels` finds from the root: our folder is
    not a package by that name, so it cannot shadow it."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'someone else'\n")
    code = ("import minillm.kernels.gelu, kernels, sys\n"
            "assert sys.path[0] == '', sys.path[:2]\n"
            "print(kernels.OWNER)")
    assert run_python(code, ROOT, {"PYTHONPATH": str(tmp_path / "site")}).strip() == "someone else"


def source_tree(dest: Path) -> Path:
    """A copy of what a clone holds (tracked and untracked-but-not-ignored files, links as links),
    so building it leaves nothing in this checkout."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, dest / name
        if not os.path.lexists(src):  # deleted in the work tree, not yet committed
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("this test builds from the git checkout's files; run it in a clone")
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_tree(tmp / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "dist").glob("minillm-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_installs_one_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    version = importlib.metadata.version("minillm")
    assert tops == {"minillm", f"minillm-{version}.dist-info"}, sorted(tops)
    top_level = zipfile.ZipFile(wheel).read(f"minillm-{version}.dist-info/top_level.txt").decode().split()
    assert top_level == ["minillm"]
    # The linked folders are inside, as files, with every op and benchmark module.
    for folder in ("kernels", "benchmarks"):
        expected = {p.name for p in (ROOT / folder).glob("*.py")}
        packed = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"minillm/{folder}/")}
        assert expected and expected <= packed, expected - packed


@pytest.mark.slow
def test_a_non_editable_install_trains_outside_the_repository(wheel, tmp_path):
    """A new venv holding minillm from its wheel (not the editable checkout) runs `import minillm`
    and a 3-step train.py from a folder outside the repository. The venv borrows this
    environment's packages through a .pth file (no downloads), added after minillm is installed,
    so pip sees an empty environment; .pth files inside the borrowed folders (the editable
    install's finder among them) are not read."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    purelib = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, python=python).strip()
    borrowed = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    Path(purelib, "borrowed.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = json.loads(run_python(
        "import json, minillm, minillm.kernels.flash_attention as fa, minillm.benchmarks.timing as t\n"
        "print(json.dumps([minillm.__file__, fa.__file__, t.__file__]))", outside, python=python))
    for path in where:
        assert inside(path, purelib) and not inside(path, ROOT), path

    shutil.copy(ROOT / "train.py", outside / "train.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(MINILLM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([python, "train.py", "--max-steps", "3", "--eval-interval", "0", "--n-layer", "2",
                           "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
                           "--no-progress", "--sample-tokens", "0", "--dtype", "float32", "--out", "run"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((outside / "run" / "summary.json").read_text())
    assert summary["steps"] == 3, summary


def pins() -> dict[str, str]:
    """constraints.txt as {name: version}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions: {line}"
            out[req.name.lower().replace("_", "-")] = spec.version
    return out


def test_every_declared_dependency_is_pinned_within_its_range():
    """Each dependency pyproject.toml declares (core and every extra) has an exact pin in
    constraints.txt, and the pin lies inside the declared range: the ranges admit what was tested."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pinned = pins()
    for text in declared:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), \
            f"{name}=={pinned[name]} (constraints.txt) is outside {req} (pyproject.toml)"

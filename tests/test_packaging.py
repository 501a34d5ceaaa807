"""pip install with compilation, as users get it: from a source distribution.

Builds the sdist, checks that it carries every file the build reads, builds a wheel from it in a
folder outside the checkout (CPU kernels only, to keep CI short; the CUDA build from an sdist is
the same setup.py path with FASTRES_CUDA=1), installs the wheel into a folder of its own and runs
a smoke test from yet another folder; checks that the wheel declares every third-party package
``import fastres`` imports. Also: a build with isolation stops with the explanation.
"""

import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent("""
    import sys
    import torch, torchvision
    import fastres
    from fastres.ops import bn_act

    assert fastres.__file__.startswith(sys.argv[1]), fastres.__file__  # the wheel, not the checkout
    facts = fastres.info()
    assert facts["backends"]["cpu"]["available"], facts["backends"]["cpu"]
    assert facts["built_against"].startswith("torch " + torch.__version__), facts["built_against"]
    torch.manual_seed(0)
    x, residual = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    stats = torch.zeros(8), torch.ones(8)
    out = bn_act(x, None, None, *stats, residual=residual, training=True, backend="cpu")
    expected = torch.relu(torch.nn.functional.batch_norm(x, *[s.clone() for s in stats],
                                                         training=True) + residual)
    torch.testing.assert_close(out, expected)
    reference = torchvision.models.resnet18().eval()
    model = fastres.convert(reference).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-4)
    print("smoke ok")
""")


def _run(command, cwd, env=None, timeout=900):
    result = subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return result


def _tracked(*patterns) -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist of a clean copy of the tracked files, as a release would build it (a checkout's
    own fastres.egg-info/SOURCES.txt would add files the manifest forgot)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in _tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    result = _run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = dist.glob("fastres-*.tar.gz")
    return path


def test_sdist_carries_every_source_the_build_reads(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = _tracked("csrc", "fastres") | {"setup.py", "pyproject.toml", "README.md"}
    assert not sorted(needed - names), f"missing from the sdist: {sorted(needed - names)}"
    shipped_build_output = [n for n in names if n.endswith(".so") or "/_build_info" in n]
    assert not shipped_build_output


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """A wheel built from the sdist in a folder outside the checkout, CPU kernels only."""
    wheels, elsewhere = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("elsewhere")
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(sdist),
        ],
        cwd=elsewhere,
        env={"FASTRES_CUDA": "0", "MAX_JOBS": "2"},
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (path,) = wheels.glob("fastres-*.whl")
    return path


def _install(wheel, site, cwd) -> None:
    """The wheel, without its dependencies, into a folder of its own (for PYTHONPATH)."""
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        cwd=cwd,
    )
    assert install.returncode == 0, install.stdout + install.stderr


def test_wheel_from_the_sdist_installs_and_runs(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _install(wheel, site, elsewhere)
    smoke = _run(
        [sys.executable, "-c", SMOKE, str(site)], cwd=elsewhere, env={"PYTHONPATH": str(site)}
    )
    assert smoke.returncode == 0 and "smoke ok" in smoke.stdout, smoke.stdout + smoke.stderr

    # The same wheel next to another torch: a warning naming both versions, no crash.
    (build_info,) = (site / "fastres").glob("_build_info_*.py")
    build_info.write_text(
        build_info.read_text().replace("TORCH_VERSION = ", "TORCH_VERSION = '2.9.0+cu126' or ")
    )
    other = _run(
        [sys.executable, "-c", "import fastres; print(fastres.info()['backends']['cpu'])"],
        cwd=elsewhere,
        env={"PYTHONPATH": str(site)},
    )
    assert other.returncode == 0, other.stderr
    assert "built against torch 2.9.0+cu126" in other.stderr and "is loaded" in other.stderr
    assert "'available': False" in other.stdout and "--no-build-isolation" in other.stdout


# Prints the distributions of the third-party modules that ``import fastres`` imports, beyond
# those ``import torch`` imports (torch is declared: what it imports is its own dependencies').
IMPORTED_DISTRIBUTIONS = textwrap.dedent("""
    import importlib.metadata, json, sys
    import torch
    before = set(sys.modules)
    import fastres
    tops = {name.partition(".")[0] for name in set(sys.modules) - before}
    owners = importlib.metadata.packages_distributions()
    print(json.dumps(sorted({d for top in tops for d in owners.get(top, ()) if d != "fastres"})))
""")


def _requires_dist(wheel) -> list[Requirement]:
    """The wheel's Requires-Dist that hold in this environment, optional extras left out."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def _installed_with(requirements: list[Requirement]) -> set[str]:
    """The distributions installing ``requirements`` installs: them and, transitively, theirs
    (as installed here, markers evaluated here)."""
    found: set[str] = set()
    pending = [r.name for r in requirements]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def test_the_wheel_declares_every_package_import_fastres_needs(wheel, tmp_path):
    """Every third-party distribution whose modules ``import fastres`` imports is declared by
    the wheel, or installed by one it declares; otherwise installing the wheel into an
    environment without it gives a fastres that fails at import."""
    site = tmp_path / "site"
    _install(wheel, site, tmp_path)
    imported = _run(
        [sys.executable, "-c", IMPORTED_DISTRIBUTIONS],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
    )
    assert imported.returncode == 0, imported.stderr
    distributions = {canonicalize_name(d) for d in json.loads(imported.stdout.splitlines()[-1])}
    requirements = _requires_dist(wheel)
    undeclared = sorted(distributions - _installed_with(requirements))
    assert not undeclared, (
        f"import fastres imports {undeclared}, which the wheel's Requires-Dist "
        f"({[str(r) for r in requirements]}) neither names nor installs"
    )


def test_an_isolated_build_stops_and_says_to_use_no_build_isolation(tmp_path):
    """With isolation, the build environment has no torch (on purpose: it would be whatever
    torch the index serves); setup.py explains instead of compiling against the wrong one."""
    result = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), ROOT],
        cwd=tmp_path,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "torch is not importable in this build environment" in output, output[-4000:]
    assert "--no-build-isolation" in output

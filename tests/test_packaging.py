"""spare-tl works as an installed package, not only from a checkout.

The embedded model's committed data ships inside the wheel (``spare_tl/embedded_data/``,
mapped from ``cache_data/`` in pyproject.toml) and is only ever read; a computed stage goes
to the user's cache. The integration test builds a wheel from a copy of this tree, installs
it into a fresh folder and loads the steering setup from somewhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from spare_tl import cache, embedded

REPO = cache.REPO_ROOT
EMBEDDED = embedded.EMBEDDED_DIR.name
# What a build of the working tree never needs (and what .gitignore keeps out of it).
_SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache",
         ".hypothesis", ".ipynb_checkpoints", "out", ".whl", ".gl", "activations"}  # fmt: skip


def _setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed_in_pyproject():
    """``packages`` is a list (the data package cannot be found): a new folder with an
    ``__init__.py`` under spare_tl/ must be added to it or the wheel leaves it out."""
    listed = set(_setuptools_config()["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "spare_tl").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_package_data_globs_match_the_committed_data():
    config = _setuptools_config()
    assert config["package-dir"]["spare_tl.embedded_data"] == "cache_data"
    globs = config["package-data"]["spare_tl.embedded_data"]
    for pattern in globs:
        assert [p for p in (REPO / "cache_data").glob(pattern) if p.is_file()], pattern
    shipped = {p for g in globs for p in (REPO / "cache_data").glob(g) if p.is_file()}
    for needed in (
        embedded.DEFAULT_FEATURES / "features.json",
        embedded.DEFAULT_FEATURES / "features.safetensors",
        embedded.DEFAULT_SAES / "blocks.12.hook_resid_post" / "sae_weights.safetensors",
        *embedded.EMBEDDED_DIR.glob("memorised/builtin-*/predictions.jsonl"),
    ):
        assert needed in shipped, needed


def test_a_checkout_reads_and_writes_its_cache_data(monkeypatch):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert embedded.SHIPPED_ROOT == REPO / "cache_data"
    assert cache.default_cache_root() == REPO / "cache_data"


def test_an_installed_package_writes_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setattr(cache, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_root() == tmp_path / "home" / ".cache" / "spare-tl"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.default_cache_root() == tmp_path / "mine"


def test_seeding_copies_a_shipped_stage_once_and_never_writes_the_shipped_folder(
    tmp_path, monkeypatch
):
    shipped = tmp_path / "shipped"
    stage = shipped / "m" / "memorised" / "builtin-abc"
    stage.mkdir(parents=True)
    (stage / "config.json").write_text("{}\n")
    (stage / "predictions.jsonl").write_text('{"a": 1}\n')
    (stage / ".predictions.jsonl.x.tmp").write_text("half")
    monkeypatch.setattr(embedded, "SHIPPED_ROOT", shipped)
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}

    user = tmp_path / "user"
    embedded.seed_from_shipped("m/memorised/builtin-abc", user)
    copied = user / "m" / "memorised" / "builtin-abc"
    assert sorted(p.name for p in copied.iterdir()) == ["config.json", "predictions.jsonl"]
    assert (copied / "predictions.jsonl").read_text() == '{"a": 1}\n'
    (copied / "predictions.jsonl").write_text("recomputed\n")
    embedded.seed_from_shipped("m/memorised/builtin-abc", user)  # present: left alone
    assert (copied / "predictions.jsonl").read_text() == "recomputed\n"
    embedded.seed_from_shipped("m/memorised/other", user)  # nothing shipped: nothing
    assert not (user / "m" / "memorised" / "other").exists()
    embedded.seed_from_shipped("m/memorised/builtin-abc", shipped)  # the cache is the source
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before
    assert not [p for p in copied.parent.iterdir() if p.name.startswith(".")]


_INSTALLED_CHECK = r"""
import json, os, sys

opened = set()


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.add(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(audit)
import spare_tl
from spare_tl import cache, embedded
from spare_tl.stages.memorised import memorised_split

model, features, saes = spare_tl.load_steering_setup()
split = memorised_split(model, features, progress=False)
print(json.dumps({
    "package": spare_tl.__file__,
    "shipped_root": str(embedded.SHIPPED_ROOT),
    "features": str(embedded.DEFAULT_FEATURES),
    "saes": str(embedded.DEFAULT_SAES),
    "cache_root": str(cache.default_cache_root()),
    "model": model.cfg.model_name,
    "sae_hooks": sorted(saes),
    "counts": {str(k): list(v) for k, v in features.counts().items()},
    "pool": len(split.pool),
    "evaluation": len(split.test),
    "opened": sorted(opened),
}))
"""


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _SKIP or n.endswith(".egg-info")}
    if Path(directory).resolve() == (REPO / "cache_data").resolve():
        skip |= {n for n in names if n != EMBEDDED}  # other models' caches are not shipped
    return skip


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.integration
def test_installed_wheel_loads_the_steering_setup_from_its_own_data(tmp_path):
    source, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    shutil.copytree(REPO, source, ignore=_ignore)
    try:  # the build backend in this environment; without it pip fetches one from PyPI
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation", "--no-index"]
    except ImportError:
        isolation = []
    _pip("wheel", "-q", "--no-deps", *isolation, "-w", str(dist), str(source), cwd=tmp_path)
    (wheel,) = dist.glob("spare_tl-*.whl")
    _pip(
        "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path
    )
    installed = site / "spare_tl" / "embedded_data" / EMBEDDED
    assert (installed / "functional_features" / "features.json").is_file()
    before = _snapshot(site)

    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (cache.CACHE_ENV, "PYTHONPATH")}
    # the de-quantised model is reused from the usual place (it is not what is tested here)
    env.setdefault("SPARE_TL_MODEL_CACHE", str(Path.home() / ".cache" / "spare-tl" / "models"))
    env.update(PYTHONPATH=str(site), HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(
        [sys.executable, "-s", "-c", _INSTALLED_CHECK],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    assert Path(got["package"]) == site / "spare_tl" / "__init__.py"
    assert Path(got["shipped_root"]) == site / "spare_tl" / "embedded_data"
    assert Path(got["features"]) == installed / "functional_features"
    assert Path(got["saes"]) == installed / "saes"
    assert Path(got["cache_root"]) == home / ".cache" / "spare-tl"
    # the data came from the installed copy, and nothing from the checkout's cache_data/
    opened = [Path(p) for p in got["opened"]]
    assert installed / "functional_features" / "features.json" in opened
    assert installed / "saes" / "blocks.12.hook_resid_post" / "cfg.json" in opened
    from_repo = [
        p for p in opened if p.is_relative_to(REPO) and not p.is_relative_to(REPO / ".venv")
    ]
    assert not from_repo, from_repo
    # the memorised set was read from a copy in the user's cache; the install is unchanged
    (memorised,) = (home / ".cache" / "spare-tl" / EMBEDDED / "memorised").iterdir()
    assert (memorised / "config.json") in opened
    assert _snapshot(site) == before

    from spare_tl.features import FunctionalFeatures

    committed = FunctionalFeatures.load(embedded.DEFAULT_FEATURES)
    assert got["model"] == committed.model_name
    assert got["counts"] == {str(k): list(v) for k, v in committed.counts().items()}
    assert got["sae_hooks"] == sorted(committed.hook_names)
    assert got["pool"] == committed.metadata.get("pool_size", 128)
    assert got["evaluation"] > 0

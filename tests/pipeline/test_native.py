"""pipeline/native.py: C kernels built once per source, compiler and CPU, cached, and optional."""

import os
import shutil

import pytest

from pipeline import native

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory, and load_library's in-process memo cleared before and after."""
    monkeypatch.setenv("RWS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RWS_NATIVE", raising=False)
    native.load_library.cache_clear()
    yield tmp_path
    native.load_library.cache_clear()


def built(cache):
    return sorted(path.name for path in cache.iterdir())


def test_builds_once_then_loads_the_cached_library(cache, monkeypatch):
    library = native.load_library("lookup_linear")
    assert library is not None and hasattr(library, "lookup_linear")
    assert len(built(cache)) == 1 and built(cache)[0].startswith("lookup_linear-")

    native.load_library.cache_clear()  # as a new process would

    def no_build(*args):
        raise AssertionError("rebuilt although the cached library matches")

    monkeypatch.setattr(native, "_build", no_build)
    assert native.load_library("lookup_linear") is not None


def test_another_cpu_gets_its_own_build(cache, monkeypatch):
    """A library built with -march=native on one node type must not load on another (illegal instructions)."""
    native.load_library("lookup_linear")
    native.load_library.cache_clear()
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    native.load_library("lookup_linear")
    assert len(built(cache)) == 2


def test_a_failed_build_warns_and_leaves_no_file(cache, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that exits 1
    with pytest.warns(RuntimeWarning, match=r"lookup_linear\.c .*false exited 1"):
        assert native.load_library("lookup_linear") is None
    assert built(cache) == []


def test_a_missing_compiler_warns(cache, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-rws")
    with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler-rws'"):
        assert native.load_library("lookup_linear") is None


def test_switched_off_by_the_environment(cache, monkeypatch, recwarn):
    monkeypatch.setenv("RWS_NATIVE", "0")
    assert native.load_library("lookup_linear") is None
    assert not recwarn.list and built(cache) == []


def test_an_edited_header_gets_its_own_build(cache, monkeypatch, tmp_path):
    """The kernels include pipeline/vectors.h: a library built against an older header must not load."""
    sources = tmp_path / "pipeline"
    sources.mkdir()
    for name in ("lookup_linear.c", "bernoulli.h", "vectors.h", "scratch.h"):
        shutil.copy(os.path.join(os.path.dirname(native.__file__), name), sources / name)
    monkeypatch.setattr(native, "__file__", str(sources / "native.py"))  # where load_library looks for sources
    assert native.load_library("lookup_linear") is not None
    native.load_library.cache_clear()
    with open(sources / "vectors.h", "a") as header:
        header.write("/* edited */\n")
    assert native.load_library("lookup_linear") is not None
    assert len([name for name in built(cache) if name.startswith("lookup_linear-")]) == 2

"""The flat layout's module paths keep importing for one release (issue 22's regrouping): each old path is the very
same module object as its new home (a monkeypatch through either reaches both), with a DeprecationWarning naming
the new path; the package face exports what users called from submodules; renamed functions still answer."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import kvmem
from helpers import random_ids, tiny_model
from kvmem._deprecation import MOVED_MODULES

# the paths the README documented before the regrouping: they must never break silently
DOCUMENTED = ["kvmem.attention", "kvmem.prefix_cache", "kvmem.batch", "kvmem.recall", "kvmem.cache",
              "kvmem.fingerprint", "kvmem.patches"]


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(MOVED_MODULES[old])
    # a fresh interpreter: in this one the alias may already be imported (the warning fires on first import)
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned:', w)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"warned: {old} moved to {MOVED_MODULES[old]}" in out.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        moved = importlib.import_module(old)
    assert moved is new and moved.__spec__.name == new.__name__  # the real module, its own spec kept


def test_documented_paths_are_all_aliased():
    assert set(DOCUMENTED) <= set(MOVED_MODULES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kvmem.attention import use_gqa_attention  # noqa: F401
        from kvmem.batch import prefill_batch  # noqa: F401
        from kvmem.cache import cache_kwarg  # noqa: F401
        from kvmem.fingerprint import forget_digests  # noqa: F401
        from kvmem.patches import rope_facts  # noqa: F401
        from kvmem.prefix_cache import static_prefix  # noqa: F401
        from kvmem.recall import MIN_SAVED_TOKENS  # noqa: F401


def test_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kvmem.no_such_module")


def test_package_face_exports_the_functions_users_called_from_submodules():
    from kvmem.cubes.fingerprint import forget_digests
    from kvmem.inject.batch import prefill_batch
    from kvmem.model.attention import use_gqa_attention
    from kvmem.model.static_cache import static_prefix

    assert kvmem.use_gqa_attention is use_gqa_attention and kvmem.static_prefix is static_prefix
    assert kvmem.prefill_batch is prefill_batch and kvmem.forget_digests is forget_digests
    for name in kvmem.__all__:
        assert getattr(kvmem, name) is not None


def test_renamed_functions_keep_their_old_names_with_a_warning(tiny_cube_pair):
    from kvmem.inject.prefill import layout_plan, splice_plan

    with pytest.warns(DeprecationWarning, match="layout_plan is renamed splice_plan"):
        assert layout_plan(tiny_cube_pair) == splice_plan(tiny_cube_pair)


@pytest.fixture
def tiny_cube_pair():
    model = tiny_model("llama")
    anchor = random_ids(3)
    return [kvmem.MemCube.from_ids(model, random_ids(5 + i), anchor_ids=anchor) for i in range(2)]


def test_the_package_ships_its_type_marker():
    from importlib import resources

    assert resources.files("kvmem").joinpath("py.typed").is_file()

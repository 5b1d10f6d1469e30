"""Loads the compiled extension `_C` (which registers torch.ops.diffusionblocks.*), honouring
DBX_DISABLE_EXT=1 (reference only) and DBX_REQUIRE_EXT=1 (fail instead of falling back).
`STATUS` says what happened, in words, for the build report."""

import os
import warnings
from pathlib import Path

from ._version import __version__

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."
STATUS = "not loaded yet"
FINE = ("loaded", "disabled by DBX_DISABLE_EXT=1")  # the statuses that need no action


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _why_not(error: ImportError) -> str:
    """Why `_C` did not import, told apart: never built, built for another torch, other."""
    if not any(Path(__file__).parent.glob("_C.*")):
        return ("this install has no compiled extension (built with DBX_SKIP_EXT=1, or never built; "
                "build it with `pip install --no-build-isolation .`)")
    if "undefined symbol" in str(error):
        import torch

        return (f"the compiled extension was built against another torch than the torch {torch.__version__} "
                f"installed now ({error}); rebuild it: `{REBUILD}`")
    return f"the compiled extension did not load ({error})"


def _warn(message: str) -> None:
    # Attributed to the package, not to a line of it: the import statement a stack level
    # would show says nothing. `-W ignore::RuntimeWarning:diffusionblocks_ext` silences it.
    warnings.warn_explicit(message, RuntimeWarning, filename="diffusionblocks_ext", lineno=0,
                           module="diffusionblocks_ext")


def load():
    """Returns the `_C` module, or None when the reference must serve every call."""
    global STATUS
    if _flag("DBX_DISABLE_EXT"):
        if _flag("DBX_REQUIRE_EXT"):
            raise ImportError("DBX_REQUIRE_EXT=1 and DBX_DISABLE_EXT=1 contradict each other; unset one")
        STATUS = FINE[1]
        return None
    try:
        from . import _C
    except ImportError as error:
        STATUS = _why_not(error)
        if _flag("DBX_REQUIRE_EXT"):
            raise ImportError(f"DBX_REQUIRE_EXT=1 but {STATUS}") from error
        _warn(f"{STATUS}; the pure-PyTorch reference serves every op")
        return None
    STATUS = _mismatch(_C) or FINE[0]
    if STATUS not in FINE:
        _warn(STATUS)
    return _C


def _mismatch(module) -> str:
    """A module that loads but was built for another version of this package (its ops may
    not match the Python side) or against another torch release (torch promises no C++ ABI
    across releases: it may link and still misbehave)."""
    if module.__version__ != __version__:
        return f"loaded, but built for version {module.__version__}, not {__version__}: rebuild it with `{REBUILD}`"
    if not hasattr(module, "build_info"):
        return f"loaded, but from a build older than this package's Python side: rebuild it with `{REBUILD}`"
    import torch

    built = module.build_info()["torch"]
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        return (f"loaded, but built against torch {built} while torch {torch.__version__} runs: "
                f"rebuild it with `{REBUILD}`")
    return ""

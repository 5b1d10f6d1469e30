"""Loads the compiled extension `_C` (which registers torch.ops.diffusionblocks.*), honouring
DBX_DISABLE_EXT=1 (reference only) and DBX_REQUIRE_EXT=1 (fail instead of falling back)."""

import os
import warnings


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load():
    """Returns the `_C` module, or None when the reference must serve every call."""
    if _flag("DBX_DISABLE_EXT"):
        if _flag("DBX_REQUIRE_EXT"):
            raise ImportError("DBX_REQUIRE_EXT=1 and DBX_DISABLE_EXT=1 contradict each other; unset one")
        return None
    try:
        from . import _C
    except ImportError as error:
        if _flag("DBX_REQUIRE_EXT"):
            raise ImportError(f"DBX_REQUIRE_EXT=1 but the compiled extension did not load: {error}. "
                              "Build it with `pip install --no-build-isolation .`") from error
        warnings.warn(f"diffusionblocks_ext: compiled extension unavailable ({error}); "
                      "using the pure-PyTorch reference", RuntimeWarning, stacklevel=3)
        return None
    return _C

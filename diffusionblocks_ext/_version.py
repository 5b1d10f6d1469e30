"""The one version number of both packages. setup.py and CMakeLists.txt read it from this
file (as text: the build must not import the package), compile it into the extension, and
both packages' `__version__` import it."""

__version__ = "0.1.0"

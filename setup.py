"""The one compiled part of nstap: the /proc/net scanner (daemon/nstap/netns/_scan.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler or no Python headers), nstap installs anyway and uses the pure-Python scanner, and
``nstap doctor`` says so.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("nstap.netns._scan", ["daemon/nstap/netns/_scan.c"], optional=True, extra_compile_args=["-O2", "-Wall", "-Werror"]),
    ],
)

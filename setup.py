"""The compiled parts of nstap: the /proc/net scanner (daemon/nstap/netns/_scan.c) and the
/metrics line formatter (daemon/nstap/_exposition.c).

Everything else is in pyproject.toml. The extensions are optional: where it cannot be built (no C
compiler or no Python headers), nstap installs anyway and uses the pure-Python scanner and formatter, and
``nstap doctor`` says so.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("nstap.netns._scan", ["daemon/nstap/netns/_scan.c"], optional=True, extra_compile_args=["-O2", "-Wall", "-Werror"]),
        Extension("nstap._exposition", ["daemon/nstap/_exposition.c"], optional=True, extra_compile_args=["-O2", "-Wall", "-Werror"]),
    ],
)

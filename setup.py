"""The C extension lives in ext/; everything else is in pyproject.toml."""
from setuptools import Extension, setup

CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-O2"]

setup(
    ext_modules=[
        Extension(
            "drvs._jail",
            sources=["ext/module.c", "ext/jail.c", "ext/seccomp.c"],
            depends=["ext/jail.h", "ext/seccomp.h"],
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "drvs._sys",
            sources=["ext/sysmodule.c", "ext/fastpath.c", "ext/seccomp.c"],
            depends=["ext/fastpath.h", "ext/seccomp.h"],
            libraries=["pthread"],
            extra_compile_args=CFLAGS,
        ),
        Extension("drvs._fs", sources=["ext/fsmodule.c"], extra_compile_args=CFLAGS),
    ]
)

"""The C extension lives in ext/; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "drvs._jail",
            sources=["ext/module.c", "ext/jail.c"],
            depends=["ext/jail.h"],
            extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-O2"],
        )
    ]
)

"""Build of the native watchdog core (csrc/); everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled the package still
installs, and the watchdog logs that it runs on its pure-Python monitor.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vllm_elastic_ft._watchdog_core",
            sources=["csrc/watchdog_core.cpp"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-Wall"],
            optional=True,
        )
    ]
)

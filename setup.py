"""The one native part: NaN/Inf checks fused with the snapshot copy
(hpresil/checkpoint/_finite.c). Optional: without a C compiler the install
still succeeds and hpresil.checkpoint.finite falls back to numpy."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hpresil.checkpoint._finite",
            ["hpresil/checkpoint/_finite.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)

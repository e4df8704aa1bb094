"""Builds tinylm's C accelerator for the tokenizer; all metadata is in pyproject.toml.

Optional by default: without a C compiler the install still succeeds and tinylm uses its
pure-Python tokenizer code, which gives the same results (only slower). With
TINYLM_REQUIRE_NATIVE=1 (as CI sets it) a failed build fails the install instead.
"""

import os
import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tinylm.tokenizer._fastbpe",
            sources=[
                "tinylm/tokenizer/_c/module.c",
                "tinylm/tokenizer/_c/pyencoder.c",
                "tinylm/tokenizer/_c/train.c",
                "tinylm/tokenizer/_c/encode.c",
                "tinylm/tokenizer/_c/scan.c",
                "tinylm/tokenizer/_c/hashmap.c",
            ],
            depends=["tinylm/tokenizer/_c/fastbpe.h"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c99"],
            optional=not os.environ.get("TINYLM_REQUIRE_NATIVE"),
        )
    ]
)

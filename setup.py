"""Build fastlisten's two extensions from .pyx at install time:

- fastlisten._core, the runtime core (csrc/fl_net.c);
- fastlisten.benchmark._native, the benchmark's load generator and C
  reference server (csrc/fl_loadgen.c, which uses fl_net.c's helpers too).

The extension is optional only where it cannot be built (no compiler, a
platform the C does not support): then the package installs with its
pure-Python core and says so.  FASTLISTEN_REQUIRE_EXTENSION=1 turns that
fallback into a build failure (CI uses it).

FASTLISTEN_SANITIZE=address,undefined (either or both) builds the C with
AddressSanitizer and/or UndefinedBehaviorSanitizer (both extensions), every error fatal
(-fno-sanitize-recover), float-to-int casts out of range included.  Such an
extension only loads with the sanitizer runtime preloaded; .ci/sanitize
shows how (LD_PRELOAD=$(gcc -print-file-name=libasan.so) ...).
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class optional_build_ext(build_ext):
    """build_ext that falls back to the pure-Python core on failure."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc):
        if os.environ.get("FASTLISTEN_REQUIRE_EXTENSION") == "1":
            raise exc
        sys.stderr.write(
            f"WARNING: fastlisten._core could not be built ({exc}); "
            "installing the pure-Python core (fastlisten.compiled is False).\n")


#: The C files of each extension (csrc/).
RUNTIME_C = ["fl_net.c", "fl_proxy.c", "fl_filter.c"]
BENCHMARK_C = ["fl_loadgen.c", "fl_net.c"]

_SANITIZERS = {
    "address": ["address"],
    # gcc leaves these out of "undefined"; the core casts timeouts
    "undefined": ["undefined", "float-cast-overflow", "float-divide-by-zero"],
}


def sanitize_flags():
    """(compile, link) flags for FASTLISTEN_SANITIZE, empty when unset."""
    wanted = [w.strip() for w in os.environ.get("FASTLISTEN_SANITIZE", "").split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(_SANITIZERS))
    if unknown:
        raise SystemExit(f"FASTLISTEN_SANITIZE: unknown sanitizer(s) {', '.join(unknown)}; "
                         f"use {','.join(_SANITIZERS)}")
    if not wanted:
        return [], []
    checks = ",".join(c for w in wanted for c in _SANITIZERS[w])
    flags = [f"-fsanitize={checks}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return flags, flags


def extensions():
    if os.environ.get("FASTLISTEN_NO_EXTENSIONS") == "1" or not sys.platform.startswith("linux"):
        return []
    from Cython.Build import cythonize

    debug = os.environ.get("FASTLISTEN_DEBUG") == "1"
    directives = {"language_level": "3", "embedsignature": True}
    macros = []
    san_compile, san_link = sanitize_flags()
    if debug:
        directives.update(linetrace=True, profile=True)
        macros.append(("CYTHON_TRACE_NOGIL", "1"))

    def extension(name, pyx, c_files):
        return Extension(
            name, sources=[pyx] + [f"csrc/{c}" for c in c_files],
            include_dirs=["csrc"], define_macros=macros,
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"] + san_compile,
            extra_link_args=san_link)

    exts = [
        extension("fastlisten._core", "src/fastlisten/_core.pyx", RUNTIME_C),
        extension("fastlisten.benchmark._native", "src/fastlisten/benchmark/_native.pyx",
                  BENCHMARK_C),
    ]
    return cythonize(exts, compiler_directives=directives,
                     include_path=["src"], annotate=debug)


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext})

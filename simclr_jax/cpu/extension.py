"""The library's C++ XLA FFI extension for XLA:CPU, built on first use: oneDNN convolutions
(``onednn_conv.cc``) and batch norms fused with their ReLU and residual add (``batch_norm.cc``).

The sources are compiled once per machine with the system C++ compiler (``$CXX``, else ``c++`` or
``g++`` on ``PATH``) against JAX's FFI headers and oneDNN (>= 3.0) into one shared library, then
loaded and registered as XLA custom-call targets. The library is cached under
``$SIMCLR_JAX_CACHE_DIR`` (default ``~/.cache/simclr_jax``), keyed by a hash of the sources, the
JAX version, ``$CXX`` as set (or unset) and the compile flags (which name oneDNN's location), and
written atomically, so concurrent processes may build it at once. A cached build whose key matches
is used without looking for a compiler, so a machine without one still uses a library built
earlier. Any failure to build (no compiler, a ``$CXX`` that does not run or fails) is a
:class:`NativeUnavailableError` naming the cause. oneDNN comes from the ``onednn`` extra
(``pip install 'simclr_jax[onednn]'``: Intel's CPU-only wheels, with GNU OpenMP threads) or
from ``$SIMCLR_JAX_ONEDNN_ROOT`` (a prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and
``lib/libdnnl.so``).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax

SOURCES = tuple(
    pathlib.Path(__file__).with_name(name) for name in ("onednn_conv.cc", "batch_norm.cc")
)
# XLA custom-call target name -> exported handler symbol.
ONEDNN_CONV_TARGETS = {
    "simclr_onednn_conv_forward": "OnednnConvForward",
    "simclr_onednn_conv_input_gradient": "OnednnConvInputGradient",
    "simclr_onednn_conv_kernel_gradient": "OnednnConvKernelGradient",
}
BATCH_NORM_TARGETS = {
    f"simclr_batch_norm_{fusion}{direction}": f"BatchNorm{name}{direction.capitalize()}"
    for fusion, name in (("", ""), ("relu_", "Relu"), ("add_relu_", "AddRelu"))
    for direction in ("forward", "backward")
}
TARGETS = {**ONEDNN_CONV_TARGETS, **BATCH_NORM_TARGETS}


class NativeUnavailableError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


def onednn_root() -> pathlib.Path:
    """The prefix oneDNN is taken from: ``$SIMCLR_JAX_ONEDNN_ROOT``, else this environment's."""
    return pathlib.Path(os.environ.get("SIMCLR_JAX_ONEDNN_ROOT") or sys.prefix)


def cache_dir() -> pathlib.Path:
    """Where built extensions are kept: ``$SIMCLR_JAX_CACHE_DIR``, else the user's cache."""
    explicit = os.environ.get("SIMCLR_JAX_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "simclr_jax"


def _compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX`` (which may carry flags), else ``c++`` or ``g++``."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise NativeUnavailableError("no C++ compiler found (set $CXX or install g++)")
    return compiler.split()


def _compile_flags(root: pathlib.Path) -> list[str]:
    """The compiler's arguments that build the extension against oneDNN under ``root``, less
    its ``-o OUTPUT``."""
    if not (root / "include/oneapi/dnnl/dnnl.hpp").is_file():
        raise NativeUnavailableError(
            f"oneDNN's headers are not under {root}/include: install the extra "
            "(pip install 'simclr_jax[onednn]') or set $SIMCLR_JAX_ONEDNN_ROOT"
        )
    if not (root / "lib/libdnnl.so").exists():
        raise NativeUnavailableError(f"oneDNN's library {root}/lib/libdnnl.so is missing")
    lib = root / "lib"
    return [
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",
        f"-I{jax.ffi.include_dir()}",
        f"-I{root / 'include'}",
        *(str(source) for source in SOURCES),
        f"-L{lib}",
        "-ldnnl",
        f"-Wl,-rpath,{lib}",
    ]


def build_extension() -> pathlib.Path:
    """The built extension's path, compiling it first unless the cache already holds it."""
    flags = _compile_flags(onednn_root())
    key = hashlib.sha256(
        b"".join(source.read_bytes() for source in SOURCES)
        + jax.__version__.encode()
        + os.environ.get("CXX", "").encode()
        + " ".join(flags).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    if target.is_file():
        return target
    command = [*_compiler(), *flags]
    compiler = f"$CXX={os.environ['CXX']!r}" if os.environ.get("CXX") else command[0]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(fd)
    except OSError as error:
        raise NativeUnavailableError(
            f"cannot write the extension cache {target.parent}: {error}"
        ) from error
    try:
        try:
            result = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
        except OSError as error:  # e.g. $CXX names a compiler that is not there
            raise NativeUnavailableError(
                f"cannot run the C++ compiler {compiler}: {error.strerror}"
            ) from error
        if result.returncode != 0:
            lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
            first_error = next((line for line in lines if "error" in line), None)
            detail = first_error or (lines[-1] if lines else f"exit status {result.returncode}")
            raise NativeUnavailableError(
                f"compiling the extension with {compiler} failed: {detail[:300]}"
            )
        os.replace(partial, target)  # atomic: readers see the whole library or none
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.cache
def _library() -> ctypes.CDLL:
    """The built (or found) extension, loaded once."""
    path = build_extension()
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeUnavailableError(f"cannot load {path}: {error}") from error


@functools.cache
def register_extension() -> None:
    """Builds (or finds) and loads the extension, and registers its XLA CPU targets, once.

    Raises:
      NativeUnavailableError: no compiler, no oneDNN, or the build or load failed.
    """
    library = _library()
    for target, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
    """None when the extension's operations are registered and usable, else why they are not."""
    try:
        register_extension()
    except NativeUnavailableError as error:
        return str(error)
    return None


@functools.cache
def bfloat16_convolutions() -> bool:
    """Whether oneDNN computes bfloat16 convolutions on this CPU (it has kernels for them only on
    CPUs with AVX-512 or newer instruction sets).

    Raises:
      NativeUnavailableError: the extension cannot be built or loaded.
    """
    return bool(_library().OnednnBfloat16Convolutions())

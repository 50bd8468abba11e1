"""Compile-and-load machinery shared by the compiled CPU kernels: one :class:`Kernel` per ``csrc/<stem>.cpp``.

A kernel is one C++ source behind a plain C ABI. On first use it is compiled with the system C++ compiler (``$CXX``,
else ``c++``/``g++``/``clang++``) into a shared library loaded with :mod:`ctypes`; no torch or Python headers are
involved, so a build takes seconds. Libraries are cached under ``$ECMNET_CACHE_DIR/<name>`` (default
``~/.cache/ecmnet/<name>``) under a file name that hashes the source (with the headers beside it), the flags, the
compiler and the CPU, so a ``-march=native`` build is never loaded on a different CPU. Builds are atomic (compile to
a temporary file, then rename), so concurrent processes at worst build twice. ``-march=native`` is tried first, then
portable flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ecmnet_core.device import CACHE_ENV, cache_dir

BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi")
NATIVE_FLAGS = ("-march=native",)

Opener = Callable[[Path], "ctypes.CDLL | None"]

#: The status codes the kernels' C functions share (0 is success).
KERNEL_ERRORS = {1: "invalid sizes", 2: "null pointer", 5: "out of memory"}


def check_status(code: int, what: str, errors: dict[int, str] = KERNEL_ERRORS) -> None:
    """Raise RuntimeError("<what> failed: <reason>") for a kernel call's non-zero status ``code``."""
    if code != 0:
        raise RuntimeError(f"{what} failed: {errors.get(code, f'error code {code}')}")


def find_compiler() -> str | None:
    """``$CXX`` if set (even when it does not exist, so a bad setting is reported), else the first C++ compiler."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_tag() -> str:
    """Identifies the CPU's instruction set, so a -march=native build is only reused on the same kind of CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86 and ARM
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in fields]
    return "\n".join(dict.fromkeys(keep)) or f"{platform.machine()} {platform.processor()}"


def abi_opener(abi_function: str, abi_version: int,
               signatures: dict[str, tuple[list | None, type | None]]) -> Opener:
    """An :data:`Opener` for a kernel library: loads it, checks ``abi_function()`` == ``abi_version`` and declares
    ``signatures`` (function name -> (argtypes, restype); None leaves ctypes' default). The opener returns None when
    the file cannot be loaded, lacks a symbol or has another ABI, so the loader rebuilds it."""

    def open_library(path: Path) -> ctypes.CDLL | None:
        try:
            lib = ctypes.CDLL(str(path))
            if getattr(lib, abi_function)() != abi_version:
                return None
            for name, (argtypes, restype) in signatures.items():
                function = getattr(lib, name)
                if argtypes is not None:
                    function.argtypes = argtypes
                function.restype = restype
        except (OSError, AttributeError):
            return None
        return lib

    return open_library


@dataclass
class BuildInfo:
    """How the library was obtained: its path, whether this process compiled it, and how long that took."""

    path: Path
    compiled: bool
    seconds: float
    flags: tuple[str, ...]


@dataclass
class LibraryLoader:
    """Builds (once; cached on disk) and loads one kernel library. Thread-safe.

    ``compiler`` None: :func:`find_compiler`; ``cache`` None: ``cache_dir(cache_name)``; ``native``: try
    ``-march=native`` first. ``source`` is the C++ file, ``stem`` the library's file-name prefix, ``opener`` loads a
    built library and declares its functions, returning None when it cannot be loaded or has another ABI (the
    library is then rebuilt). ``what`` names the kernel in the warning. ``load()`` returns the :class:`ctypes.CDLL`,
    or None with the reason in ``error`` (warned once).
    """

    compiler: str | None = None
    cache: Path | None = None
    native: bool = True
    error: str | None = None
    info: BuildInfo | None = None
    _lib: ctypes.CDLL | None = None
    _tried: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The kernel this loader builds (set by Kernel.new_loader).
    source: Path | None = field(default=None, kw_only=True)
    stem: str = field(default="", kw_only=True)
    opener: Opener | None = field(default=None, kw_only=True, repr=False)
    cache_name: str = field(default="", kw_only=True)
    what: str = field(default="compiled CPU kernel", kw_only=True)
    # Flags tried first (e.g. -fopenmp); a portable build without them is the last resort.
    extra_flags: tuple[str, ...] = field(default=(), kw_only=True)

    def load(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    self._lib = self._load()
                except Exception as exc:  # no compiler, compile error, unwritable cache, unloadable library
                    self.error = str(exc)
                    warnings.warn(f"{self.what} unavailable: {self.error}; "
                                  "falling back to the slower 'torch' backend", RuntimeWarning, stacklevel=3)
                self._tried = True
        return self._lib

    def _flag_sets(self) -> list[tuple[str, ...]]:
        """Compiler flags to try in order: with ``extra_flags`` (native, then portable), then plain portable."""
        base = BASE_FLAGS + self.extra_flags
        sets = ([base + NATIVE_FLAGS] if self.native else []) + [base]
        return sets + [BASE_FLAGS] if self.extra_flags else sets

    def _load(self) -> ctypes.CDLL:
        if self.source is None or self.opener is None or not self.stem or not self.cache_name:
            raise RuntimeError("LibraryLoader needs source, stem, opener and cache_name")
        compiler = self.compiler or find_compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60,
                                     check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"C++ compiler {compiler!r} does not run ({exc})") from None
        if not self.source.is_file():
            raise RuntimeError(f"kernel source {self.source} is missing from the installation")
        # the kernel and the headers beside it (ecmnet_simd.h): a change to either must rebuild
        headers = sorted(self.source.parent.glob("*.h"))
        source = b"\0".join([self.source.read_bytes(), *(h.read_bytes() for h in headers)])
        cache = _writable(self.cache or cache_dir(self.cache_name), self.cache_name)
        failures = []
        for flags in self._flag_sets():
            key = b"\0".join([source, " ".join(flags).encode(), compiler.encode(), version.encode(),
                               _cpu_tag().encode()])
            path = cache / f"{self.stem}_{hashlib.sha256(key).hexdigest()[:16]}.so"
            start = time.perf_counter()
            lib = self.opener(path) if path.is_file() else None  # None also for a damaged cache entry: rebuild it
            compiled = lib is None
            if lib is None:
                error = _compile(compiler, flags, path, self.source)
                if error:
                    failures.append(f"{compiler} {' '.join(flags)}: {error}")
                    continue
                lib = self.opener(path)
                if lib is None:
                    raise RuntimeError(f"the freshly built {path} cannot be loaded")
            self.info = BuildInfo(path, compiled, time.perf_counter() - start, flags)
            return lib
        raise RuntimeError("compiling the kernel failed: " + " | ".join(failures))


def _writable(directory: Path, name: str) -> Path:
    """``directory``, created if needed, or the per-user temporary directory ``name`` when it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"ecmnet-{user}" / name
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compile(compiler: str, flags: tuple[str, ...], path: Path, source: Path) -> str | None:
    """Compile ``source`` to ``path`` atomically (temporary file, then rename); the compiler's error text, else None."""
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit status {proc.returncode}"
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Kernel:
    """One compiled kernel: the C++ source ``csrc/<stem>.cpp`` (the Python module has the same stem), its ABI
    check and C signatures, and the :class:`LibraryLoader` that builds and loads it (``loader``; replace it with
    :meth:`new_loader` to build elsewhere, e.g. in tests).

    Args:
        stem: the source's stem, also the library's file-name prefix and cache folder name.
        abi_function, abi_version: ``abi_function()`` must return ``abi_version`` (else the library is rebuilt).
        signatures: C function name -> (argtypes, restype), declared on load.
        what: names the kernel in warnings and errors ("compiled CPU selective scan").
        extra_flags: flags tried first (``-fopenmp``: the kernel runs on PyTorch's intra-op threads).
    """

    def __init__(self, stem: str, abi_function: str, abi_version: int,
                 signatures: dict[str, tuple[list | None, type | None]], what: str,
                 extra_flags: tuple[str, ...] = ()) -> None:
        self.stem, self.what, self.abi_version, self.extra_flags = stem, what, abi_version, tuple(extra_flags)
        self.source = Path(__file__).resolve().parent / "csrc" / f"{stem}.cpp"
        self.opener = abi_opener(abi_function, abi_version, signatures)
        self.loader = self.new_loader()

    def new_loader(self, **overrides) -> LibraryLoader:
        """A loader for this kernel; ``overrides`` (compiler, cache, native, extra_flags ...) win."""
        settings = {"source": self.source, "stem": self.stem, "opener": self.opener, "cache_name": self.stem,
                    "what": self.what, "extra_flags": self.extra_flags, **overrides}
        return LibraryLoader(**settings)

    def load(self) -> ctypes.CDLL | None:
        """The library, compiled on first call (cached on disk); None, after one warning, if it cannot be built."""
        return self.loader.load()

    def available(self) -> bool:
        """True when the compiled kernel can be used (builds it on first call)."""
        return self.load() is not None

    def require(self) -> ctypes.CDLL:
        """The library, or RuntimeError with the reason it is unavailable."""
        lib = self.load()
        if lib is None:
            raise RuntimeError(f"{self.what} unavailable: {self.loader.error}")
        return lib

    @property
    def error(self) -> str | None:
        return self.loader.error

    @property
    def info(self) -> BuildInfo | None:
        """How this process obtained the library (None before the first use or when unavailable)."""
        return self.loader.info

    def cache_dir(self) -> Path:
        return cache_dir(self.stem)


__all__ = ["BASE_FLAGS", "CACHE_ENV", "NATIVE_FLAGS", "BuildInfo", "Kernel", "abi_opener",
           "cache_dir", "find_compiler"]

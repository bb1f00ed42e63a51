"""Building the C++ sources of ``ops.Custom(func_type="aot")`` operators, once per machine.

MindSpore's CPU backend launches every kernel for ~15 µs and some of its
kernels are far slower than PyTorch's; a few hot paths are therefore C++
operators built with g++ on first use. A library is cached in
``$MIND_DIFFUSION_CACHE`` (default ``$XDG_CACHE_HOME/mind_diffusion`` or
``~/.cache/mind_diffusion``) under a name that hashes its source and compiler
flags, so an edited source rebuilds; it is compiled to a temporary file and
renamed into place, so parallel processes (msrun workers, test runners) never
load a half-written library.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

DEFAULT_FLAGS = ("-std=c++17", "-O3", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC")
# Every source is compiled with csrc/ on the include path for the shared header, whose text
# is part of every library's hash.
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SHARED_HEADER = os.path.join(INCLUDE_DIR, "md_kernel.h")


def cache_dir():
    """Where built kernel libraries live."""
    root = os.environ.get("MIND_DIFFUSION_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mind_diffusion")
    return root


def build(source, flags=DEFAULT_FLAGS, link=()):
    """Compile ``source`` into a shared library unless a build of the same source, shared header and flags exists.

    :param source: path of the C++ file.
    :param flags: compiler flags (must make a shared library).
    :param link: extra arguments after the source, e.g. ``("-lpthread",)``.
    :return: ``(path, "built" | "cached")``, or ``(None, reason)`` when no library can be had.
    """
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    with open(source, "rb") as f, open(SHARED_HEADER, "rb") as h:
        text = f.read() + h.read()
    digest = hashlib.sha256(text + " ".join((*flags, "|", *link)).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(source))[0]
    directory = cache_dir()
    target = os.path.join(directory, f"{stem}-{digest}.so")
    if os.path.isfile(target):
        return target, "cached"
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as err:
        return None, f"cannot write the kernel cache {directory}: {err}"
    try:
        result = subprocess.run([compiler, *flags, "-I", INCLUDE_DIR, "-o", tmp, source, *link],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        if result.returncode != 0:
            return None, f"g++ failed ({result.returncode}): {result.stdout.strip()[-2000:]}"
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: other processes see no library or the whole one
        return target, "built"
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"building {stem} failed: {err}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def switched_off(switch, what):
    """Why a C++ path is not taken before any build, or None.

    :param switch: its environment variable; 0/false/off/no turn the path off (default on).
    :param what: its name in messages, e.g. "fast GroupNorm".
    :return: "disabled by SWITCH=value", "graphs built for X (the WHAT is CPU-only)" when the
        graph target (:func:`mind_diffusion.device.graph_target`) is not CPU, or None.
    """
    value = os.environ.get(switch, "1")
    if value.strip().lower() in ("0", "false", "off", "no"):
        return f"disabled by {switch}={value}"
    from mind_diffusion.device import graph_target  # reads MindSpore's context: the build helpers above need none
    target = graph_target()
    if target != "CPU":
        return f"graphs built for {target} (the {what} is CPU-only)"
    return None


def load_once(cache, lock, build, unavailable):
    """The library path in ``cache``, built once per process by ``build()``.

    :param cache: the caller's module-level dict; gets "path", "reason" and "info".
    :param build: () → (path or None, reason) or (path or None, reason, info).
    :param unavailable: start of the one RuntimeWarning when the build fails,
        e.g. "fast GroupNorm unavailable, using pure ops".
    """
    with lock:
        if "path" not in cache:
            path, reason, *info = build()
            cache.update(path=path, reason=reason, info=info[0] if info else None)
            if path is None:
                warnings.warn(f"mind_diffusion: {unavailable} ({reason})", RuntimeWarning, stacklevel=4)
        return cache["path"]


def library_status(switch, what, cache, library, label="C++ kernels"):
    """(use_fast, reason) of a C++ path: off by env or device, not built (why), or which library."""
    off = switched_off(switch, what)
    if off:
        return False, off
    if library() is None:
        return False, cache["reason"]
    info = f"; {cache['info']}" if cache.get("info") else ""
    return True, f"{label} ({os.path.basename(cache['path'])}{info})"


def op_once(ops_cache, library_cache, lock, key, make, unavailable):
    """The Custom operator under ``key``, made once per process by ``make()``.

    Returns None when MindSpore refuses to make it (e.g. an ``MS_CUSTOM_AOT_WHITE_LIST``
    that excludes the kernel cache): the caller then takes its fallback. The first refusal
    of a library warns once, ``"mind_diffusion: {unavailable} (why)"``; later ones are silent.

    :param ops_cache: the caller's dict of operators (None for refused ones).
    :param library_cache: the caller's :func:`load_once` dict; records the refusal.
    """
    with lock:
        if key in ops_cache:
            return ops_cache[key]
    try:
        op = make()
    except (TypeError, ValueError, RuntimeError) as err:
        with lock:
            warn = "refused" not in library_cache
            library_cache["refused"] = str(err)
        if warn:
            warnings.warn(f"mind_diffusion: {unavailable} ({err})", RuntimeWarning, stacklevel=3)
        op = None
    with lock:
        ops_cache[key] = op
    return op

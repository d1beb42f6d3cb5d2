"""What the model and the data are, as a short digest: the pipeline's cache keys on content, not on names.

KFP caches a step on its inputs. ``prepare`` takes the model and data as
strings, so a model updated in place at the same path (``gs://bucket/model/``)
would reuse the old baseline and every step after it. The pipeline's first
step (never cached) computes :func:`fingerprint` and hands it to ``prepare``
as an input, so new content means a new cache key:

- a local file: sha256 of its bytes; a local directory (a SavedModel): sha256
  over every file's relative path and content;
- a remote URI (``gs://``, ``s3://``, ...): what ``tf.io.gfile.stat`` says of
  every object (size and modification time; object stores change both when an
  object is rewritten), without downloading anything;
- ``demo:*``: the name and the kfopt version (its training code); ``digits``: the
  name and scikit-learn's version (the dataset ships with it);
- ``py:module:function``: never the same twice (a unique value), since what a
  loader returns can change without its code changing (it may read remote or
  rewritten files), so such a run is never served stale from the cache. A
  loader module that defines ``kfopt_fingerprint()`` (no arguments, returning
  a string that changes when its data does, e.g. a dataset version) is keyed on
  that value instead, and its runs are cached.

Every fingerprint also holds kfopt's version and the installed plugin
packages' versions (what computes every step), so an upgrade runs anew.

A source that does not exist is ``missing`` (the ``prepare`` step then says
what is wrong and how to fix it, as it would without this step); one whose
content cannot be told (a URI ``tf.io.gfile`` cannot stat, a loader module
that fails to import or whose ``kfopt_fingerprint()`` raises) gets a unique
value, so the run is not served from the cache rather than possibly stale: the
fingerprint step never fails. Nothing here imports TensorFlow unless a remote
URI is given (or a loader module imports it).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

#: Bytes read at a time when hashing a file.
CHUNK = 1 << 20
#: What a source that does not exist is.
MISSING = "missing"


#: The function a ``py:`` loader's module may define to make its data cacheable (see the module docstring).
LOADER_FINGERPRINT = "kfopt_fingerprint"


def fingerprint(model: str, data: str) -> str:
    """One hex digest of the model's and the data's :func:`describe` and of :func:`code_versions`."""
    digest = hashlib.sha256()
    digest.update(f"code\n{code_versions()}\n".encode())
    for kind, source in (("model", model), ("data", data)):
        try:
            described = describe(source, kind)
        except Exception as exc:  # this step is never cached and must not fail: unknown content is never stale
            described = _unknown(kind, source, exc)
        digest.update(f"{kind}={source}\n{described}\n".encode())
    return digest.hexdigest()


def code_versions() -> str:
    """kfopt's, TensorFlow's, tf-keras's, tfmot's and every installed kfopt plugin package's versions, one per line."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    from kfopt import __version__

    plugins = set()
    for name in ("tensorflow", "tf-keras", "tensorflow-model-optimization"):  # what measures and converts
        try:
            plugins.add(f"{name} {version(name)}")
        except PackageNotFoundError:
            plugins.add(f"{name} not installed")
    try:
        for dist in distributions():
            # Plugin packages register techniques under the "kfopt" entry-point group (plugins.manager).
            if any(entry.group == "kfopt" for entry in dist.entry_points):
                plugins.add(f"{dist.metadata['Name']} {dist.version}")
    except Exception as exc:  # broken metadata of some package: still a key, never a crash
        plugins.add(f"plugins unknown ({type(exc).__name__})")
    return "\n".join([f"kfopt {__version__}", *sorted(plugins)])


def describe(source: str, kind: str = "model") -> str:
    """A string that changes when the content behind ``source`` changes (see the module docstring)."""
    if source.startswith("demo:"):
        from kfopt import __version__

        return f"kfopt {__version__}"
    if source == "digits":
        from importlib.metadata import version

        return f"scikit-learn {version('scikit-learn')}"
    if source.startswith("py:"):
        return _python_loader(source)
    if "://" in source:
        return _remote(source, kind)
    path = Path(source)
    if path.is_file():
        return "sha256:" + _file_sha256(path)
    if path.is_dir():
        return "sha256:" + _dir_sha256(path)
    return MISSING


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()  # os.walk order is the file system's; the digest must not depend on it
        for name in sorted(files):
            file = Path(root) / name
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _remote(uri: str, kind: str) -> str:
    """Size and modification time of every object under ``uri`` (tf.io.gfile: gs://, s3://, hdfs://, ...)."""
    from kfopt import _tf

    gfile = _tf.tf().io.gfile
    try:
        if not gfile.exists(uri):
            return MISSING
        if not gfile.isdir(uri):
            return _stat_line(gfile, uri, "")
        lines = []
        base = uri.rstrip("/")
        for root, _, files in gfile.walk(uri):
            for name in sorted(files):
                full = f"{root.rstrip('/')}/{name}"
                lines.append(_stat_line(gfile, full, full[len(base) :].lstrip("/")))
        return "\n".join(sorted(lines))
    except Exception as exc:  # no credentials, a scheme without stat: never a stale cache hit
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"fingerprint: cannot stat the {kind} '{uri}' ({type(exc).__name__}: {first}); not cached", flush=True)
        return f"unknown {uuid.uuid4()}"


def _stat_line(gfile, uri: str, name: str) -> str:
    stat = gfile.stat(uri)
    return f"{name}\0{stat.length}\0{stat.mtime_nsec}"


def _python_loader(spec: str) -> str:
    """What a ``py:module:function`` loader's data is: its module's ``kfopt_fingerprint()``, else a unique value.

    The loader's source cannot tell: the same code may read files that were
    rewritten since (a bucket, a database), so keying on it would serve a stale
    baseline from the cache. Without ``kfopt_fingerprint()`` every run is new.
    """
    import importlib
    import importlib.util

    module = spec[3:].split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module)
        if found is None:
            return f"not found {uuid.uuid4()}"  # prepare reports a loader it cannot import
        loaded = importlib.import_module(module)
        declared = getattr(loaded, LOADER_FINGERPRINT, None)
        if not callable(declared):
            return f"not cacheable {uuid.uuid4()}"
        # The loader's own code too: new preprocessing over the same data version is new data.
        source = hashlib.sha256(Path(loaded.__file__).read_bytes()).hexdigest() if loaded.__file__ else "-"
        return f"{LOADER_FINGERPRINT}: {declared()}\nloader source {source}"
    except (Exception, SystemExit) as exc:  # a module that fails (or exits) on import, a fingerprint that
        return _unknown("data", spec, exc)  # raises: run anew, never crash this never-cached step


def _unknown(kind: str, source: str, exc: BaseException) -> str:
    """A unique value for a source whose content cannot be told (said in the step's log)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    print(f"fingerprint: cannot tell the {kind} '{source}' ({type(exc).__name__}: {first}); not cached", flush=True)
    return f"unknown {uuid.uuid4()}"


__all__ = ["fingerprint", "describe", "code_versions", "LOADER_FINGERPRINT"]

"""Limits on what kfopt reads, checked before it is loaded.

A small file can ask for a lot: a 2 MB ``.npz`` whose headers claim a 2 GiB
array, a YAML recipe whose aliases expand into billions of nodes. kfopt reads
the headers (the zip directory and each array's ``.npy`` header) and the YAML
events first, and refuses what is over the limit before anything is
allocated. Limits have sane defaults and can be raised: ``--max-data-bytes``
(or ``KFOPT_MAX_DATA_BYTES``, which the option sets so pipeline steps see the
same limit) and ``KFOPT_MAX_YAML_BYTES``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import zipfile
from pathlib import Path
from typing import IO

from .errors import KfoptError

#: What the arrays of a data file may take once loaded, in bytes (8 GiB).
DEFAULT_MAX_DATA_BYTES = 8 * 1024**3
MAX_DATA_BYTES_ENV = "KFOPT_MAX_DATA_BYTES"
#: The largest recipe or search YAML file read (1 MiB: hundreds of recipes).
DEFAULT_MAX_YAML_BYTES = 1024**2
MAX_YAML_BYTES_ENV = "KFOPT_MAX_YAML_BYTES"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4})


def parse_bytes(text: str | int, what: str = "the size") -> int:
    """``8GiB``, ``500MB``, ``1e9`` or a plain number of bytes, as an int > 0; a KfoptError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not match or match.group(2) not in _UNITS:
            raise KfoptError(
                f"{what} '{text}' is not a size.", "give bytes, or a number with a unit: 500MB, 8GiB, 2TB."
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise KfoptError(f"{what} '{text}' is not positive.", "give a size above zero, e.g. 8GiB.")
    return value


def _limit(env: str, default: int) -> int:
    given = os.environ.get(env)
    return parse_bytes(given, env) if given else default


def max_data_bytes() -> int:
    """The limit on a data file's arrays: ``$KFOPT_MAX_DATA_BYTES`` (set by ``--max-data-bytes``), else 8 GiB."""
    return _limit(MAX_DATA_BYTES_ENV, DEFAULT_MAX_DATA_BYTES)


def max_yaml_bytes() -> int:
    """The limit on a recipe or search YAML file: ``$KFOPT_MAX_YAML_BYTES``, else 1 MiB."""
    return _limit(MAX_YAML_BYTES_ENV, DEFAULT_MAX_YAML_BYTES)


def human(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it >= 1 (``2.0 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


# -- npz ----------------------------------------------------------------------------------
def check_npz(file: IO[bytes], where: str, limit: int | None = None) -> None:
    """Refuse an ``.npz`` whose arrays would take more than ``limit`` bytes, from its headers alone.

    Two headers decide what loading costs: the zip directory (each member's
    uncompressed size, which the zip reader never exceeds) and each member's
    ``.npy`` header (shape and dtype, which numpy allocates in full before it
    reads a byte). Both are checked, and an array the header claims to be larger
    than the bytes stored for it is refused as forged. ``file`` is left at its start.
    """
    import numpy as np

    limit = max_data_bytes() if limit is None else limit
    fix = (
        f"raise the limit (--max-data-bytes, now {human(limit)}) if the data really is that large, "
        "or pass a py:module:function loader that streams it as tf.data."
    )
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise KfoptError(f"{where} is not an .npz (zip) file ({exc}).", "re-create it with np.savez.") from None
    total = 0
    with archive:
        for info in archive.infolist():
            total += info.file_size
            if total > limit:
                raise KfoptError(
                    f"{where} unpacks to more than {human(limit)} ({human(total)} in its first members, by its zip "
                    "headers); refused before loading.",
                    fix,
                )
            if not info.filename.endswith(".npy"):
                continue
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        shape, _, dtype = np.lib.format._read_array_header(member, version)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise KfoptError(
                    f"{where}: member '{info.filename}' is not a readable .npy array ({exc}).",
                    "re-create the file with np.savez.",
                ) from None
            claimed = math.prod(int(d) for d in shape) * dtype.itemsize
            if claimed > info.file_size:
                raise KfoptError(
                    f"{where}: '{info.filename}' claims a {'x'.join(map(str, shape)) or 'scalar'} {dtype} array "
                    f"({human(claimed)}) but stores only {human(info.file_size)}; refused before loading "
                    "(a forged header).",
                    "re-create the file with np.savez.",
                )
    file.seek(0)


# -- YAML ---------------------------------------------------------------------------------
def load_yaml(path: str | os.PathLike, what: str):
    """The content of the YAML file ``path`` (a recipe or a search space), read safely.

    Safe: only plain data (``yaml.SafeLoader``), no anchors or aliases (what
    billion-laughs files are built from, and never needed in a recipe), at most
    :func:`max_yaml_bytes` bytes, and no nesting deep enough to exhaust the stack.
    ``what`` names the file in errors ("Recipe file", "Search file").
    """
    import yaml

    path = Path(path)
    limit = max_yaml_bytes()
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise KfoptError(
            f"{what} '{path}' is larger than {human(limit)}; refused before parsing.",
            f"a recipe file is a few lines: check you passed the right file (or raise ${MAX_YAML_BYTES_ENV}).",
        )
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_no_alias_loader())  # noqa: S506 (a SafeLoader subclass)
    except _AliasRefused as exc:
        raise KfoptError(
            f"{what} '{path}' uses a YAML {exc.kind} ({exc.where}); kfopt refuses anchors and aliases "
            "(they can expand a small file into billions of nodes).",
            "write each value out in full.",
        ) from None
    except UnicodeDecodeError as exc:
        raise KfoptError(f"{what} '{path}' is not UTF-8 text ({exc.reason}).", "save it as UTF-8.") from None
    except RecursionError:
        raise KfoptError(f"{what} '{path}' is nested too deeply to be a recipe.", "fix the YAML.") from None
    except yaml.YAMLError as exc:
        raise KfoptError(
            f"{what} '{path}' is not valid YAML ({str(exc).splitlines()[0]}).", "fix the YAML syntax."
        ) from None


class _AliasRefused(Exception):
    def __init__(self, kind: str, mark):
        self.kind = kind
        self.where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


@functools.cache
def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """A SafeLoader that stops at the first anchor or alias, before anything is built from it."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise _AliasRefused("alias", self.peek_event().start_mark)
            event = self.peek_event()
            if getattr(event, "anchor", None) is not None:
                raise _AliasRefused("anchor", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader

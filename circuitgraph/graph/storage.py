"""Atomic, versioned output folders: a reader sees the old contents or the new, never a mix.

A folder ``G`` written here is a symbolic link to a hidden sibling version directory
``.G.v-<time>-<random>``. A save writes every file into a fresh version directory, records their
SHA-256 digests in ``manifest.json`` (written last), then switches ``G`` to it with one atomic
``rename`` of a new link over the old one. So:

* a kill at any point of a save leaves the previous version in place and loadable;
* a reader that resolves ``G`` once (:func:`resolve_version`) reads one version throughout;
* two writers never touch each other's files; the last switch wins;
* files of an earlier version (a ``features.json`` the new trace did not write, a ``full/``
  subgraph) cannot be attached to a new one: each version holds only what its save wrote.

Old versions are removed by later saves once they are neither current nor the one before, and
older than :data:`KEEP_SECONDS` (a reader that resolved them just before the switch can finish);
so are leftovers of killed saves. A plain directory written by an older release is moved aside
into a version on the first save (a few microseconds in which ``G`` does not exist).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from circuitgraph.errors import CircuitGraphError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEEP_SECONDS = 60.0
"""Old versions younger than this are kept (readers may still be inside them)."""


def file_mode() -> int:
    """The mode an ordinary new file gets here (0666 less the umask), for every file we write."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _versions(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}.v-*"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


GRAPH_FILES = {"graph.json", "graph.safetensors", "features.json", MANIFEST}
CHILD_DIRS = {"full"}


def is_graph_folder(folder: Path) -> bool:
    """Whether a plain directory holds only what a graph save writes (an older release's graph folder)."""
    if not (folder / "graph.json").is_file():
        return False
    for p in folder.iterdir():
        if p.is_dir() and p.name in CHILD_DIRS and is_graph_folder(p):
            continue
        if p.is_file() and (p.name in GRAPH_FILES or ".tmp" in p.name):
            continue
        return False
    return True


def check_writable(folder: str | Path, is_file: bool = False) -> Path:
    """Refuse, before any work, an output (a folder, or a file with ``is_file``) whose parent
    cannot be created or written."""
    folder = Path(folder)
    parent = folder.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CircuitGraphError(f"cannot write {folder}: {probe} is a file, not a folder; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CircuitGraphError(f"cannot write {folder}: {probe} is not writable; choose another --out")
    if is_file and folder.is_dir():
        raise CircuitGraphError(f"cannot write {folder}: it is a folder, not a file; choose another --out")
    if not is_file and folder.exists() and not folder.is_symlink() and not folder.is_dir():
        raise CircuitGraphError(f"cannot write {folder}: it is a file, not a folder; choose another --out")
    return folder


def check_graph_target(folder: str | Path) -> Path:
    """:func:`check_writable`, and refuse a folder that is not a graph folder (a save would replace it)."""
    folder = check_writable(folder)
    if folder.is_dir() and not folder.is_symlink() and any(folder.iterdir()) and not is_graph_folder(folder):
        raise CircuitGraphError(f"{folder} exists and is not a graph folder (it holds other files); nothing was "
                                "written. Choose a new --out")
    if folder.is_symlink() and not resolve_version(folder).name.startswith(f".{folder.name}.v-"):
        raise CircuitGraphError(f"{folder} is a link that no graph save made; choose a new --out")
    return folder


def check_distinct(out: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an output that is one of the inputs or lies inside one (it would overwrite or alter it)."""
    o = Path(out).absolute().resolve()
    for i in inputs:
        if i is None:
            continue
        src = Path(i).absolute()
        for p in {src, src.resolve()}:
            if o == p or p in o.parents or o in p.parents:
                raise CircuitGraphError(f"the output {out} would overwrite the input {i}; write it elsewhere")


def save_versioned(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh version directory, then switch ``folder`` to it."""
    folder = Path(folder).absolute()
    check_graph_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    name = f".{folder.name}.v-{time.time_ns():020d}-{secrets.token_hex(4)}"
    version = folder.parent / name
    version.mkdir()
    try:
        write(version)
        files = sorted(p for p in version.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {str(p.relative_to(version)): _digest(p) for p in files}
        for p in files:
            os.chmod(p, file_mode())
        (version / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(version / MANIFEST, file_mode())
        _fsync_dir(version)
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()  # an empty folder (e.g. made by hand for the output)
        if folder.exists() and not folder.is_symlink():  # an older release's graph folder (checked above)
            os.rename(folder, folder.parent / f".{folder.name}.v-00000000000000000000-legacy{secrets.token_hex(2)}")
        link = folder.parent / f".{folder.name}.link-{secrets.token_hex(4)}"
        os.symlink(name, link)
        os.replace(link, folder)
        _fsync_dir(folder.parent)
    except (OSError, SafetensorError) as err:  # a full disk, a vanished folder, a permission change
        shutil.rmtree(version, ignore_errors=True)
        raise CircuitGraphError(f"could not write {folder} ({err}); the previous contents are unchanged. Free some "
                                "space or choose another --out") from err
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    _clean(folder)
    return folder


def resolve_version(folder: str | Path) -> Path:
    """The directory ``folder`` means now, every link on the way resolved once (so ``G/full`` is read
    from one version of ``G``)."""
    return Path(folder).resolve()


def verify_manifest(version: Path) -> None:
    """Check every file of a version against its recorded digest (when the version has a manifest)."""
    path, prefix = version / MANIFEST, ""
    if not path.is_file():  # a child graph (``full/``): its digests are in the parent's manifest
        path, prefix = version.parent / MANIFEST, version.name + "/"
        if not path.is_file():
            return
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CircuitGraphError(f"{path} is corrupt ({err}); re-run the command that wrote it") from err
    for rel, digest in manifest.items():
        if not rel.startswith(prefix):
            continue
        p = path.parent / rel
        if not p.is_file() or _digest(p) != digest:
            raise CircuitGraphError(f"{p} does not match its recorded digest (changed or truncated after it was "
                                    "written); re-run the command that wrote it")


def _clean(folder: Path) -> None:
    """Remove versions that are neither current nor previous and older than KEEP_SECONDS, and stale links."""
    current = resolve_version(folder).name if folder.is_symlink() else None
    now = time.time()
    versions = [v for v in _versions(folder) if v.name != current]
    for v in versions[:-1]:  # keep the newest non-current one (the previous version)
        try:
            if now - v.stat().st_mtime > KEEP_SECONDS:
                shutil.rmtree(v, ignore_errors=True)
        except FileNotFoundError:
            pass
    for link in folder.parent.glob(f".{folder.name}.link-*"):
        try:
            if now - link.lstat().st_mtime > KEEP_SECONDS:
                link.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Atomic file writes: a temporary sibling, consistent permissions, one ``os.replace``.

A kill at any point leaves the old file or the new one. The temporary file is named after the
writing process (``NAME.tmp<pid>``); a later write of the same file removes temporaries whose
process is gone, so killed writes leave nothing behind for long. Every file gets the mode an
ordinary new file gets (0666 less the umask), whatever library wrote it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dictionaries.errors import DictionaryError


def file_mode() -> int:
    """The mode an ordinary new file gets here (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: Path) -> None:
    """Remove ``path``'s temporaries left by processes that no longer exist."""
    for tmp in path.parent.glob(path.name + ".tmp*"):
        suffix = tmp.name[len(path.name) + 4 :]
        if not suffix.isdigit() or (int(suffix) != os.getpid() and not _alive(int(suffix))):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and move ``tmp`` over ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only or vanished folder
        tmp.unlink(missing_ok=True)
        raise DictionaryError(f"could not write {path} ({err}); the previous file is unchanged. Free some space or "
                              "choose another --out") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """:func:`safetensors.torch.save_file`, atomically."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

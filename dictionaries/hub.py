"""Hugging Face Hub references: ``hf:ORG/REPO[/PATH]`` wherever a dictionary folder is accepted.

:func:`resolve_hub_reference` downloads the repository (only ``PATH`` and what lies below it, with
``huggingface_hub.snapshot_download``'s ``allow_patterns``) into the Hugging Face cache, or finds it
there, and returns the local path of ``PATH``; :func:`dictionaries.persistence.load_dictionaries`
then reads it like any local file or folder (format detection included). Examples::

    hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71   # one Gemma Scope params.npz
    hf:jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre       # one SAELens SAE folder

The cache is ``HF_HUB_CACHE`` (read when called) or Hugging Face's default. With ``HF_HUB_OFFLINE=1``
nothing is downloaded: a cached copy is used, and an absent one fails at once with the command
that fetches it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dictionaries.errors import DictionaryError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"


def is_hub_reference(text: str | Path) -> bool:
    """Whether ``text`` is a ``hf:ORG/REPO[/PATH]`` reference (a ``Path`` never is)."""
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def parse_hub_reference(ref: str) -> tuple[str, str]:
    """``hf:ORG/REPO[/PATH]`` -> ``(ORG/REPO, PATH)`` (``PATH`` may be empty)."""
    parts = [p for p in ref[len(HUB_PREFIX):].strip().split("/") if p]
    if not ref.startswith(HUB_PREFIX) or len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise DictionaryError(f"{ref!r} is not a hub reference; write hf:ORG/REPO or hf:ORG/REPO/PATH, "
                              "e.g. hf:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _fetch_hint(repo_id: str, path: str) -> str:
    include = f" --include '{path}/*'" if path else ""
    return f"`hf download {repo_id}{include}`"


def resolve_hub_reference(ref: str, cache_dir: str | Path | None = None) -> Path:
    """The local path of ``hf:ORG/REPO[/PATH]``, downloaded into the cache when needed and allowed.

    Raises:
        DictionaryError: a malformed reference; the repository or path does not exist; it is not
            cached and downloads are off (``HF_HUB_OFFLINE=1``) or the Hub cannot be reached.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, path = parse_hub_reference(ref)
    cache_dir = str(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    patterns = [path, f"{path}/*"] if path else None
    logger.info("hub: %s (files %s) into %s%s", repo_id, patterns or "all", cache_dir, " (offline)" if offline else "")
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir,
                                          local_files_only=offline))
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise DictionaryError(f"{ref}: the Hugging Face Hub has no repository {repo_id} you can read (private or "
                              f"gated repositories need `hf auth login`) ({type(err).__name__})") from err
    except RevisionNotFoundError as err:
        raise DictionaryError(f"{ref}: {repo_id} has no main revision ({err})") from err
    except HFValidationError as err:
        raise DictionaryError(f"{ref}: {repo_id!r} is not a valid repository id ({err})") from err
    except LocalEntryNotFoundError as err:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else "the Hub could not be reached")
        raise DictionaryError(f"{ref}: {repo_id} is not in the local Hugging Face cache ({cache_dir}) and {why}; "
                              f"fetch it once with network access ({_fetch_hint(repo_id, path)}, or unset "
                              "HF_HUB_OFFLINE), point HF_HUB_CACHE at a cache that holds it, or give a local folder"
                              ) from err
    except (HfHubHTTPError, OSError) as err:  # a network error, or an incomplete cached snapshot when offline
        raise DictionaryError(f"{ref}: downloading {repo_id} failed ({type(err).__name__}: {err}); "
                              f"retry with network access or fetch it with {_fetch_hint(repo_id, path)}") from err
    local = snapshot / path if path else snapshot
    if not local.exists():
        if offline:
            raise DictionaryError(f"{ref}: the cached copy of {repo_id} ({snapshot}) has no {path!r}; check the path "
                                  f"or fetch it with {_fetch_hint(repo_id, path)}")
        raise DictionaryError(f"{ref}: repository {repo_id} has no {path!r}; check the path in the repository")
    return local

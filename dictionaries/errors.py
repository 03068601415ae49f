"""User-facing errors of dictionary training and loading; each names the problem and the fix."""

from __future__ import annotations


class DictionaryError(ValueError):
    """Bad input to dictionary training or loading (site, architecture, file, data)."""

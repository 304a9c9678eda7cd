"""The one exception type the data package raises for bad input files."""

from __future__ import annotations


class DatasetError(ValueError):
    """An annotation file, image file or dataset folder is missing or malformed.

    The message always names the offending file and, where there is one, the record in it
    (image id, annotation id, VIA entry), so the user can find and fix it.
    """

"""Seeing and exporting graphs: the offline HTML viewer and exports other tools read."""

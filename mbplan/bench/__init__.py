"""Measurements behind ``mbplan bench ...`` (library code: returns rows, never prints)."""

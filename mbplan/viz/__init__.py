"""Figures behind ``mbplan viz ...``: each module defines ``COMMAND = (name, help, Options, run)``."""

"""Figures behind ``mbplan viz ...``.

Each module that defines ``COMMAND = (name, help, Options, run)`` is a subcommand.
"""

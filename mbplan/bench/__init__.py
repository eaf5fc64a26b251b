"""Measurements behind ``mbplan bench ...``.

Besides ``overhead`` (registered in :mod:`mbplan.cli`), each module that defines
``COMMAND = (name, help, Options, run)`` is a subcommand: ``run(opts)`` prints a short summary
table and writes its data file and figure through :mod:`mbplan.report`.
"""

"""The commands of ``dreamteacher <command>``, one module each (``cache-features`` is ``cache_features.py``):
``add_parser(subparsers)`` declares the command's options, ``run(args)`` does the work and returns an exit code.
``dreamteacher.cli`` lists them in ``COMMANDS`` and holds the entry point; ``_args.py`` holds the argument types
and checks several commands share. A module imports only the standard library and ``dreamteacher.faults`` at its
top; what its run needs (torch, diffusers, timm, the library modules) it imports inside ``run``.
"""

"""Subcommands of ``gmix``, one module each (see :mod:`gmix_curvature.cli`)."""

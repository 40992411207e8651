"""CLI commands: one light module each (see `danlu.cli`)."""

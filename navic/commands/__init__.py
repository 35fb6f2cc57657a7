"""Subcommands of ``navic`` beyond run/demo: each module registers itself on :data:`navic.cli.main`."""

"""Subcommands of the fastlisten command line; see fastlisten.cli."""

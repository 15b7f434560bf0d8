"""One module per ``cotune`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""

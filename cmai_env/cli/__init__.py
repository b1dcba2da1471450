"""The ``cmai`` command line: one module per subcommand group."""

"""The ``edgevit`` command line: one module per command."""

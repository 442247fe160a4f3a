"""The ``peftkit`` command line."""

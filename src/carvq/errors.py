"""The one exception type carvq raises for bad input: the CLI prints its message and exits 1."""


class CarvqError(Exception):
    """A user-facing error: bad input file, impossible option, unsupported model."""

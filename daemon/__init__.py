"""omsd: everything that touches the outside world (VTEX, HTTP, the clock, the CLI)."""

__version__ = "0.1.0"

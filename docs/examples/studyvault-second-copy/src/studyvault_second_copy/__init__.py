"""studyvault-second-copy: keep a second copy of every archived study in another archive."""

__version__ = "1.0.0"

"""``python -m studyvault``."""

from .cli import main

main()

"""`python -m services.tiering` serves; `python -m services.tiering migrate` migrates."""

from servicekit.entrypoint import main

from .server import build

main("tiering", build)

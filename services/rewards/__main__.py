"""`python -m services.rewards` serves; `python -m services.rewards migrate` migrates."""

from servicekit.entrypoint import main

from .server import build

main("rewards", build)

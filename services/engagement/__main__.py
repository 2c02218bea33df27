"""`python -m services.engagement` serves; `python -m services.engagement migrate` migrates."""

from servicekit.entrypoint import main

from .server import build

main("engagement", build)

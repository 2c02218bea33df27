"""`python -m services.member` serves; `python -m services.member migrate` migrates."""

from servicekit.entrypoint import main

from .server import build

main("member", build)

"""`python -m nvq` runs the command line."""

from nvq.cli import main

main()

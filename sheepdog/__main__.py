"""`python -m sheepdog` is the `sheepdog` command."""

from sheepdog.cli import main

main()

"""`python -m slimctl` runs the CLI."""
from .cli import main

main()

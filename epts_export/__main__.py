"""``python -m epts_export``: the command line, also what ``torchrun -m epts_export`` starts on each rank."""

from .cli import main

main()

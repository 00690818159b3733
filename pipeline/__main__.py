"""``python -m kdpipe`` is the ``kdpipe`` command."""

from kdpipe.cli import main

main(prog_name="kdpipe")

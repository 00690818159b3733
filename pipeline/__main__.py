"""``python -m pipeline`` is the ``kdpipe`` command."""

from pipeline.cli import main

main(prog_name="kdpipe")

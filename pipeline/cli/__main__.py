"""``python -m pipeline.cli``: the ``rae-pipeline`` command (torchrun runs it this way)."""
from pipeline.cli import main

main()

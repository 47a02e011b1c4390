"""The ``rae-pipeline`` command line. Each stage registers its commands from its own module; heavy
imports (torch, Ray, zarr) happen inside the commands, so ``--help`` is instant."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="rae-pipeline",
    help="Encode images once into latent stores with a frozen representation encoder, then train "
    "DiT^DH and the RAE decoder on the cached latents, sample and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules with a `register(app)` function, in the order their commands appear in --help.
COMMAND_MODULES = [
    "pipeline.cli_encode",
    "pipeline.cli_interop",
    "pipeline.cli_train",
    "pipeline.cli_decoder",
    "pipeline.cli_evaluate",
    "pipeline.cli_sample",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

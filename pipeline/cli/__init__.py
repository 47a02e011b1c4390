"""The ``rae-pipeline`` command line: the top floor, above ``pipeline/`` and ``trainer/``. Each stage
registers its commands from its own module here; heavy imports (torch, Ray, zarr) happen inside the
commands, so ``--help`` is instant. Every command ends with one line and exit code 1 on a
:class:`~schemas.errors.UserError` (see ``common.user_command``)."""
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
    "pipeline.cli.encode",
    "pipeline.cli.interop",
    "pipeline.cli.train",
    "pipeline.cli.decoder",
    "pipeline.cli.evaluate",
    "pipeline.cli.sample",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()

"""The `kvmem` command: build, inspect and demo MemCubes; keep, share, search and ask a store of memories.

Fast to start: nothing heavy (torch, transformers) is imported until a command needs it, and transformers'
progress bars and logs stay out of the output. A `CubeError` anywhere ends the command with its one-line
message and exit status 1, not a traceback.

One module per command group (bundles.py, calibrate.py, cubes.py, store.py); each registers its commands on the one typer app (app.py).
"""

from . import bundles, calibrate, cubes, evolve, store  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app", "main"]


def main():
    app(prog_name="kvmem")


if __name__ == "__main__":
    main()

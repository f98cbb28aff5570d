"""`python -m dhad_trainer launch FILE` (the pod entrypoint), `... worker FILE` (what torchrun runs); any
other arguments go to the `dhad` command line."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "launch":
        from dhad_trainer.runtime.launcher import launch

        return int(launch(argv[1]))
    if len(argv) == 2 and argv[0] == "worker":
        from dhad_trainer.runtime.worker import main as worker

        return worker(argv[1])
    from dhad_trainer.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

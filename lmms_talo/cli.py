"""`lmms-talo`: one console script, one module per subcommand under lmms_talo.commands
(`<name>_command.py` is the subcommand `<name>`, underscores as dashes).

Each command module exposes `HELP` (one line) and `add_arguments(parser)` and `run(args) -> int`;
commands that hand their arguments to another CLI (eval, lm-eval) set `PASSTHROUGH = True`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from lmms_talo import commands


def _command_modules() -> dict:
    found = {}
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        found[getattr(module, "NAME", info.name.removesuffix("_command").replace("_", "-"))] = module
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = _command_modules()
    if argv and argv[0] in modules and getattr(modules[argv[0]], "PASSTHROUGH", False):
        return modules[argv[0]].run(argv[1:])
    parser = argparse.ArgumentParser(
        prog="lmms-talo", description="TaLo: task-adaptive layer knockout for lmms-eval and lm-eval"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in sorted(modules.items()):
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if not getattr(module, "PASSTHROUGH", False):
            module.add_arguments(command)
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())

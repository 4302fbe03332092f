"""The pretraining entry point: flags -> validated config -> derived values -> run."""
from __future__ import annotations

from megalite.arguments import ConfigError, build_parser, config_from_namespace, resolve
from megalite.distributed import launched_world_size


def main(argv: list[str]) -> int:
    """`megalite train`: validate the flags for the launched world size and print the derived values."""
    parser = build_parser()
    config = config_from_namespace(parser.parse_args(argv))
    try:
        config, derived = resolve(config, launched_world_size())
    except ConfigError as e:
        parser.error(str(e))
    print(derived.table())
    return 0

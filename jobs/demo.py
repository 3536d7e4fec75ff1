"""The demo behind `make demo`, on an embedded local Ray.

    python jobs/demo.py [--config configs/demo.yaml] [--output-dir demo_output]
"""
from __future__ import annotations

from clip_platform import cli, config
from clip_platform.demo import DemoConfig, run_demo


def main(argv=None) -> None:
    parser = config.parser(DemoConfig, __doc__)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML recipe; flags override it")
    args = parser.parse_args(argv)
    run_demo(config.from_args(DemoConfig, args, config.load_yaml(args.config), source=args.config))


if __name__ == "__main__":
    cli.run(main)

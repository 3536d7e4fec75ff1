"""The demo behind `make demo`, on an embedded local Ray.

    python jobs/demo.py [--config configs/demo.yaml] [--output-dir demo_output]
"""
from __future__ import annotations

import argparse

from clip_platform import cli, config
from clip_platform.demo import DemoConfig, run_demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML recipe")
    parser.add_argument("--output-dir", help="where the demo writes its files")
    args = parser.parse_args(argv)
    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    run_demo(config.build(DemoConfig, config.load_yaml(args.config), overrides))


if __name__ == "__main__":
    cli.run(main)

"""The `datong` command line."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="datong",
      description="Datong: one Transformer backbone for text, images and image-text pretraining.")
  parser.add_argument("--version", action="store_true", help="print the version and exit")
  parser.add_subparsers(dest="command", metavar="COMMAND")
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.version:
    from datong import __version__  # pylint: disable=import-outside-toplevel
    print(__version__)
    return 0
  if args.command is None:
    parser.print_help()
    return 0
  return 0


if __name__ == "__main__":
  sys.exit(main())

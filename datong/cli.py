"""The `datong` command line.

    datong recipes                                   # list recipes
    datong config gpt-pydoc --set train.steps=100    # show a recipe's settings
    datong train gpt-pydoc --workdir runs/gpt --set train.steps=100
"""

import argparse
import sys

# Exit codes of `datong train` (README, "Reliability").
EXIT_DONE = 0  # trained to train.steps and evaluated (or already finished)
EXIT_ERROR = 2  # bad settings or input, unusable workdir or checkpoint: nothing ran
EXIT_NONFINITE = 3  # stopped on a NaN/inf loss; the last checkpoint is good
EXIT_STOPPED = 75  # stopped early (SIGTERM, Ctrl-C): resumable, run the same command again

EXIT_CODES = f"""exit codes of `datong train`:
  {EXIT_DONE}   finished (or already finished)
  {EXIT_ERROR}   bad settings or input, or an unusable workdir/checkpoint (the message says which)
  {EXIT_NONFINITE}   stopped on a NaN/inf loss or gradient (the last checkpoint is good)
  {EXIT_STOPPED}  stopped early by SIGTERM/SIGINT with a checkpoint saved: run it again to resume"""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="datong",
      description="Datong: one Transformer backbone for text, images and image-text pretraining.")
  parser.add_argument("--version", action="store_true", help="print the version and exit")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  sub.add_parser("recipes", help="list the registered recipes")

  def add_overrides(p):
    p.add_argument("recipe", help="recipe name (see `datong recipes`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted name, e.g. train.steps=100 "
                        "(repeatable; `datong config RECIPE` lists the names)")

  config = sub.add_parser("config", help="print a recipe's resolved settings")
  add_overrides(config)

  train = sub.add_parser("train", help="train (or resume) a recipe in a workdir",
                         epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_overrides(train)
  train.add_argument("--workdir", required=True,
                     help="where checkpoints, metrics.jsonl, TensorBoard logs and plots go; "
                          "an existing run there is resumed")
  train.add_argument("--no-progress", action="store_true", help="no progress bar")
  train.add_argument("--coordinator", help="multi-host: coordinator host:port "
                     "(or DATONG_COORDINATOR); the same command runs on every host")
  train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  train.add_argument("--process-id", type=int, help="multi-host: this process's index")

  sweep = sub.add_parser(
      "sweep", help="run every point of a grid of settings (one run each; resumable)",
      description="Runs `datong train RECIPE` for every point of the product of the --grid "
                  "axes, each in WORKDIR/<point>/, and writes WORKDIR/summary.csv. Finished "
                  "points are skipped and interrupted ones resume: run the same command again.")
  add_overrides(sweep)
  sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                     help="one axis: KEY=V1,V2 or K1/K2=a1/b1,a2/b2 to set keys together "
                          "(repeatable; keys as in --set)")
  sweep.add_argument("--workdir", required=True, help="the sweep's directory")
  sweep.add_argument("--parallel", type=int, default=1, help="points run at once (default 1)")
  sweep.add_argument("--metric", help="eval metric shown in the table (default: the recipe's)")

  fit = sub.add_parser(
      "fit", help="fit scaling laws L(N), L(D), L(N, D) to a sweep",
      description="Fits L(N) = E + A N^-alpha, L(D) = E + B D^-beta and L(N, D) = E + A "
                  "N^-alpha + B D^-beta to a sweep's summary.csv (Huber loss on log-loss, "
                  "bootstrap 95%% intervals); writes fit.json and PNG plots.")
  fit.add_argument("workdir", help="a `datong sweep` directory")
  fit.add_argument("--metric", help="the eval metric to fit (default: the recipe's)")
  fit.add_argument("--params", default="non_embedding", choices=("non_embedding", "total"),
                   help="which parameter count is N (default non_embedding)")
  fit.add_argument("--budget", type=float, action="append", default=[], metavar="FLOPS",
                   help="a compute budget C = 6ND for the compute-optimal N and D (repeatable; "
                        "default: the sweep's largest and 10x it)")
  fit.add_argument("--predict", metavar="N=...,D=...", help="predict the loss at N, D")
  fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
  fit.add_argument("--out", help="where fit.json and the plots go (default WORKDIR/fit)")
  return parser


def _parse_overrides(items):
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
    out[key.strip()] = value.strip()
  return out


def _resolved_config(args):
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  return config_lib.override(recipes.get(args.recipe), _parse_overrides(args.overrides))


def _run(args) -> int:
  if args.command == "recipes":
    from datong.train import recipes  # pylint: disable=import-outside-toplevel
    for name, doc in recipes.describe().items():
      print(f"{name:16s} {doc}")
    return 0
  if args.command == "config":
    from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
    config = _resolved_config(args)
    for name in config_lib.field_names(config):
      print(f"{name} = {config_lib.get_field(config, name)!r}")
    return 0
  if args.command == "train":
    from datong.train import loop  # pylint: disable=import-outside-toplevel
    loop.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = _resolved_config(args)
    result = loop.train(config, args.workdir, progress=False if args.no_progress else None)
    return EXIT_STOPPED if result.preempted else EXIT_DONE
  if args.command == "sweep":
    from datong.train import sweep  # pylint: disable=import-outside-toplevel
    axes = [sweep.parse_axis(spec) for spec in args.grid]
    return sweep.run(args.recipe, axes, args.workdir, sets=_parse_overrides(args.overrides),
                     parallel=args.parallel, metric=args.metric)
  if args.command == "fit":
    return _fit(args)
  return 0


def _fit(args) -> int:
  import os  # pylint: disable=import-outside-toplevel
  from datong.train import scaling, sweep  # pylint: disable=import-outside-toplevel
  rows = sweep.read_summary(args.workdir)
  metric = args.metric or sweep.read_sweep_info(args.workdir).get("metric")
  if not metric:
    raise ValueError(f"the sweep in {args.workdir} names no metric (a recipe without METRIC); "
                     "pass --metric, e.g. --metric eval/loss.")
  if args.bootstrap < 10:
    raise ValueError(f"--bootstrap {args.bootstrap}: use at least 10 resamples.")
  predict = scaling.parse_predict(args.predict) if args.predict else None
  result = scaling.fit_sweep(rows, metric, params=args.params, bootstrap=args.bootstrap)
  flops = 6.0 * result["data"]["N"] * result["data"]["D"]
  budgets = args.budget or [float(flops.max()), 10.0 * float(flops.max())]
  rec = scaling.report(result, metric, budgets=budgets, predict=predict)
  out = args.out or os.path.join(args.workdir, "fit")
  os.makedirs(out, exist_ok=True)
  paths = [scaling.write_report(rec, out)] + scaling.plot_fits(result, metric, out)
  print(scaling.format_report(rec))
  print("wrote " + ", ".join(paths))
  return 0


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
  from datong.train.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from datong.train.loop import NonFiniteLossError  # pylint: disable=import-outside-toplevel
  try:
    return _run(args)
  except NonFiniteLossError as e:
    print(f"datong: stopped: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  except (ValueError, CheckpointError, FileNotFoundError, ImportError) as e:
    print(f"datong: error: {e}", file=sys.stderr)
    return EXIT_ERROR
  except OSError as e:  # a full disk, a vanished mount: the cause, not a traceback
    print(f"datong: error: {e.strerror or e} ({getattr(e, 'filename', '') or ''}). The last "
          "checkpoint written is intact; fix the cause and run the same command again.",
          file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
  sys.exit(main())

"""The command line: parse, validate, call the pipeline. Thin by design.

    ebtrain [search] [flags]    EB-Train: search, prune and retrain every ticket, print the table
    ebtrain train [flags]       train the dense network (the baseline)
    ebtrain prune TICKET        write the physically pruned network of a ticket
    ebtrain retrain TICKET      train a ticket's pruned network through the rest of the schedule
    ebtrain lottery [flags]     lottery-ticket experiment: prune, reset, retrain, with controls
    ebtrain report RUN [RUN..]  one table across runs: accuracy, FLOPs, savings, seconds
    ebtrain models              the registered architectures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import SECTIONS, Config, apply_overrides, field_type, fields_of, load_yaml
from .errors import UserError

COMMANDS = ("search", "train", "prune", "retrain", "lottery", "report", "models")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise UserError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`--lr`, `--eb-rule`, ...); only flags given on the line override."""
    parser.add_argument("--config", help="YAML config file (defaults < file < flags)")
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} settings")
        for f in fields_of(section):
            kind = field_type(f)
            help_text = f.metadata["help"] + f" (default: {f.default if kind is not list else f.default_factory()})"
            kwargs = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=help_text)
            if kind is bool:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            elif kind is list:
                group.add_argument(_flag(f.name), nargs="+", type=_number, metavar="X", **kwargs)
            else:
                group.add_argument(_flag(f.name), type=kind if kind is not str else None, **kwargs)


def _number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ebtrain", description="Find Early-Bird tickets and train them.")
    parser.add_argument("--version", action="version", version=f"ebtrain {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("search", help="EB-Train: search, prune and retrain every ticket (the default)")
    _add_config_flags(p)
    p = sub.add_parser("train", help="train the dense network for the full schedule (the baseline)")
    _add_config_flags(p)
    p = sub.add_parser("prune", help="write the physically pruned network of a ticket")
    p.add_argument("ticket", help="a ticket file, RUN/tickets/pNN.pt")
    p.add_argument("--output", help="where to write the pruned model (default: next to the ticket)")
    p = sub.add_parser("retrain", help="train a ticket's pruned network through the rest of the schedule")
    p.add_argument("ticket", help="a ticket file, RUN/tickets/pNN.pt")
    _add_config_flags(p)
    p = sub.add_parser("lottery", help="lottery-ticket experiment: iterative magnitude pruning with resetting, "
                       "random-reinit and random-pruning controls, several seeds")
    _add_config_flags(p)
    p = sub.add_parser("report", help="one table across runs: accuracy, training FLOPs, savings, seconds")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--format", default="text", choices=("text", "markdown", "csv", "json"))
    p.add_argument("--plot", metavar="PATH", help="also write test accuracy against training FLOPs as a PNG")
    p = sub.add_parser("models", help="list the registered architectures with parameter counts")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--num-classes", type=int, default=10)
    return parser


def resolve_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """base (default: the defaults) < --config FILE < flags; with --resume, the run's own saved config."""
    overrides: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    if overrides.get("run", {}).get("resume"):
        from .rundir import config_for_resume
        out = overrides["run"].get("out")
        if not out:
            raise UserError("--resume needs --out RUN_DIR: the run to continue")
        return config_for_resume(out)
    cfg = load_yaml(args.config, base) if args.config else (base or Config())
    return apply_overrides(cfg, overrides)


def validate(cfg: Config) -> None:
    """Check settings before any work starts; raises UserError naming the bad value."""
    from .models import list_models
    if cfg.model.arch not in list_models():
        from .models import build_model
        build_model(cfg.model.arch)  # raises the registry's own "unknown arch" message
    checks = [
        (all(0 < r < 1 for r in cfg.search.ratios), f"--ratios {cfg.search.ratios}: each must lie in (0, 1)"),
        (0 < cfg.search.eps < 1, f"--eps {cfg.search.eps}: must lie in (0, 1)"),
        (cfg.search.queue_length >= 2, f"--queue-length {cfg.search.queue_length}: must be at least 2"),
        (cfg.search.sparsity >= 0, f"--sparsity {cfg.search.sparsity}: must be 0 or more"),
        (cfg.search.max_search_epochs >= 0, f"--max-search-epochs {cfg.search.max_search_epochs}: must be 0 or more"),
        (2 <= cfg.search.bits <= 24, f"--bits {cfg.search.bits}: must lie between 2 and 24"),
        (cfg.search.precision == "fp32" or cfg.train.optimizer == "sgd",
         f"--precision {cfg.search.precision} rounds SGD's momentum: use --optimizer sgd"),
        (cfg.train.epochs > 0, f"--epochs {cfg.train.epochs}: must be positive"),
        (cfg.train.batch_size > 0, f"--batch-size {cfg.train.batch_size}: must be positive"),
        (cfg.train.eval_batch_size > 0, f"--eval-batch-size {cfg.train.eval_batch_size}: must be positive"),
        (cfg.train.lr > 0, f"--lr {cfg.train.lr}: must be positive"),
        (cfg.model.width > 0, f"--width {cfg.model.width}: must be positive"),
        (all(0 < m < cfg.train.epochs for m in cfg.train.milestones),
         f"--milestones {cfg.train.milestones}: each must be a fraction in (0, 1) or an epoch inside the "
         f"{cfg.train.epochs}-epoch schedule"),
        (cfg.data.train_subset >= 0, f"--train-subset {cfg.data.train_subset}: must be 0 (all) or positive"),
        (cfg.data.val_size >= 0, f"--val-size {cfg.data.val_size}: must be 0 (none) or positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _print_table(run_dir: Path) -> None:
    from .report import format_rows, run_rows
    rows = run_rows(run_dir)
    if rows:
        print(format_rows(rows), end="")


def _run(args: argparse.Namespace) -> None:
    if args.command == "models":
        from .models import build_model, count_params, list_models
        for name in list_models():
            n = count_params(build_model(name, num_classes=args.num_classes, width=args.width))
            print(f"{name:14s} {n:>12,d} parameters")
        return
    if args.command == "report":
        from .report import format_rows, plot_acc_vs_flops, run_rows
        rows = [row for run in args.runs for row in run_rows(run)]
        print(format_rows(rows, args.format), end="")
        if args.plot:
            plot_acc_vs_flops(args.runs, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
        return
    if args.command == "prune":
        _prune(args)
        return
    if args.command == "retrain":
        _retrain(args)
        return
    if args.command == "lottery":
        _lottery(args)
        return
    cfg = resolve_config(args)
    validate(cfg)
    from . import pipeline
    from .data import load_data
    from .rundir import prepare_run_dir
    from .train import resolve_device
    resolve_device(cfg.train.device)
    data = load_data(cfg.data, seed=cfg.train.seed)  # before the run directory: bad data leaves no run behind
    run_dir = prepare_run_dir(cfg)
    print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    job = pipeline.dense_only if args.command == "train" else pipeline.eb_train
    try:
        job(cfg, run_dir, data)
    except KeyboardInterrupt:
        # every file is written atomically, so what is on disk is the last finished epoch
        print(f"ebtrain: interrupted; continue with: python -m ebtrain {args.command} --resume --out {run_dir}",
              file=sys.stderr)
        raise SystemExit(130) from None
    _print_table(run_dir)
    print(f"summary: {run_dir / 'summary.json'}", file=sys.stderr)


def _prune(args: argparse.Namespace) -> None:
    from .models import count_params, save_model
    from .pipeline import load_ticket, pruned_from_ticket, ratio_name
    ticket = load_ticket(args.ticket)
    dense, pruned = pruned_from_ticket(ticket)
    out = Path(args.output) if args.output else Path(args.ticket).with_name(f"{ratio_name(ticket['ratio'])}-pruned.pt")
    save_model(pruned, out, ratio=ticket["ratio"], eb_epoch=ticket["epoch"])
    print(f"ticket p = {ticket['ratio']:g} drawn at epoch {ticket['epoch']}")
    print(f"{'layer':32s} {'dense':>6s} {'kept':>6s}")
    for name, total, kept in zip(ticket["layers"], ticket["dense_channels"], ticket["kept_channels"]):
        print(f"{name:32s} {total:6d} {kept:6d}")
    before, after = count_params(dense), count_params(pruned)
    print(f"parameters: {before:,d} -> {after:,d} ({100 * after / before:.1f}%)")
    print(f"pruned model: {out} (load with ebtrain.load_pruned)")


def _retrain(args: argparse.Namespace) -> None:
    from .data import load_data
    from .pipeline import load_ticket, ratio_name, retrain_ticket
    from .rundir import CONFIG_FILE
    from .train import resolve_device
    ticket = load_ticket(args.ticket)
    # the ticket's own run settings (data, schedule) are the base, so a bare `retrain TICKET` matches it
    run_config = Path(args.ticket).parent.parent / CONFIG_FILE
    base = load_yaml(run_config) if run_config.is_file() else Config()
    base.run.out = ""  # the run's own folder is not the retrain's; --out may still name one
    cfg = resolve_config(args, base)
    validate(cfg)
    init = cfg.search.init
    out = Path(cfg.run.out) if cfg.run.out else (
        Path(args.ticket).parent.parent / "retrain" / f"{ratio_name(ticket['ratio'])}"
        f"{'' if init == 'eb' else '-' + init}")
    result = retrain_ticket(cfg, Path(args.ticket), out, load_data(cfg.data, seed=cfg.train.seed),
                            resolve_device(cfg.train.device), init)
    print(f"retrained p = {ticket['ratio']:g} ({init}): final test accuracy "
          f"{100 * result['final_test_acc']:.2f}%, best {100 * result['best_test_acc']:.2f}% -> {out}")


def _lottery(args: argparse.Namespace) -> None:
    from . import lottery
    from .data import load_data
    from .rundir import prepare_run_dir
    from .train import resolve_device
    cfg = resolve_config(args)
    validate(cfg)
    resolve_device(cfg.train.device)
    data = load_data(cfg.data, seed=cfg.train.seed)
    lottery.check_config(cfg, data)  # before the run directory: bad settings leave no run behind
    run_dir = prepare_run_dir(cfg)
    print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    summary = lottery.run_lottery(cfg, run_dir, data)
    print(lottery.format_table(summary), end="")
    print(f"results: {run_dir / lottery.LOTTERY_FILE}, plots: {run_dir / 'lottery_accuracy.png'}, "
          f"{run_dir / 'lottery_early_stop.png'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ebtrain` and `python -m ebtrain`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "search")  # EB-Train is the default command
    try:
        _run(build_parser().parse_args(argv))
    except UserError as e:
        print(f"ebtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebtrain: interrupted; continue with --resume --out RUN_DIR", file=sys.stderr)
        return 130
    return 0

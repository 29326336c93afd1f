"""The command line: parse, validate, call the pipeline. Thin by design.

    ebtrain [search] [flags]    EB-Train: search, prune and retrain every ticket, print the table
    ebtrain train [flags]       train the dense network (the baseline)
    ebtrain prune TICKET        write the physically pruned network of a ticket
    ebtrain retrain TICKET      train a ticket's pruned network through the rest of the schedule
    ebtrain lottery [flags]     lottery-ticket experiment: prune, reset, retrain, with controls
    ebtrain report RUN [RUN..]  one table across runs: accuracy, FLOPs, savings, seconds
    ebtrain report A B --tickets  how far the tickets of two runs agree, channel by channel
    ebtrain models              the registered architectures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, distributed
from .config import SECTIONS, Config, apply_overrides, field_type, fields_of, flag, load_yaml
from .errors import UserError
from .host_memory import retain_freed_memory
from .rundir import CHECKPOINT_FILE, SUMMARY_FILE, config_to_resume
from .validate import check_model, check_ticket_fits, check_ticket_names, validate

COMMANDS = ("search", "train", "prune", "retrain", "lottery", "report", "models")
DISTRIBUTED_COMMANDS = ("search", "train", "retrain")  # the ones that run under torchrun


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        raise UserError(message)


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
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            elif kind is list:
                group.add_argument(flag(f.name), nargs="+", type=_number, metavar="X", **kwargs)
            else:
                group.add_argument(flag(f.name), type=kind if kind is not str else None, **kwargs)


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
    p.add_argument("--tickets", action="store_true",
                   help="instead, compare the tickets of two runs: channels on which their masks agree, per ratio")
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
        return config_to_resume(overrides, args.config)
    cfg = load_yaml(args.config, base) if args.config else (base or Config())
    return apply_overrides(cfg, overrides)


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
        from .report import format_agreement, format_rows, plot_acc_vs_flops, run_rows, ticket_agreement_rows
        if args.tickets:
            if len(args.runs) != 2:
                raise UserError(f"report --tickets compares two runs, got {len(args.runs)}")
            print(format_agreement(ticket_agreement_rows(*args.runs), *args.runs), end="")
            return
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
    from .tickets import ratio_name
    from .train import resolve_device
    if args.command == "search":
        check_ticket_names([ratio_name(r) for r in cfg.search.ratios], cfg.search.ratios)
    resolve_device(cfg.train.device)
    with distributed.main_first():  # rank 0 builds a dataset's cache before the others read it
        data = load_data(cfg.data, seed=cfg.train.seed)  # before the run directory: bad data leaves no run behind
    check_model(cfg, data, early_bird=args.command == "search")
    run_dir = prepare_run_dir(cfg)
    if distributed.is_main():
        print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    job = pipeline.dense_job if args.command == "train" else pipeline.eb_train
    try:
        job(cfg, run_dir, data)
    except KeyboardInterrupt:
        _interrupted(f"python -m ebtrain {args.command} --resume --out {run_dir}")
    if distributed.is_main():
        _print_table(run_dir)
        print(f"summary: {run_dir / SUMMARY_FILE}", file=sys.stderr)


def _interrupted(how_to_continue: str) -> NoReturn:
    """Ctrl-C: the file being written was finished first (checkpoint.finishing_before_interrupt), so what
    is on disk is the last finished epoch; say how to go on and exit with 130, as shells do for SIGINT."""
    print(f"ebtrain: interrupted; continue with: {how_to_continue}", file=sys.stderr)
    raise SystemExit(130) from None


def _prune(args: argparse.Namespace) -> None:
    from .models import count_params, save_model
    from .tickets import load_ticket, pruned_from_ticket, ratio_name
    ticket = load_ticket(args.ticket)
    dense, pruned = pruned_from_ticket(ticket)
    file_name = f"{ratio_name(ticket['ratio'])}-pruned.pt"
    out = Path(args.output) if args.output else Path(args.ticket).with_name(file_name)
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; name the file to write, e.g. {out / file_name}")
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
    from .pipeline import retrain_ticket
    from .rundir import retrain_dir, run_of_ticket, saved_config
    from .tickets import load_ticket
    from .train import resolve_device
    ticket = load_ticket(args.ticket)
    # the ticket's own run settings (data, schedule) are the base, so a bare `retrain TICKET` matches it
    base = saved_config(run_of_ticket(args.ticket)) or Config()
    base.run.out = ""  # the run's own folder is not the retrain's; --out may still name one
    base.model.arch, base.model.width = ticket["arch"]["name"], ticket["arch"]["width"]  # the ticket's network
    cfg = resolve_config(args, base)
    validate(cfg)
    init = cfg.search.init
    out = Path(cfg.run.out) if cfg.run.out else retrain_dir(run_of_ticket(args.ticket), ticket["ratio"], init)
    with distributed.main_first():
        data = load_data(cfg.data, seed=cfg.train.seed)
    check_ticket_fits(cfg, data, ticket, args.ticket)
    check_model(cfg, data, early_bird=False)
    try:
        result = retrain_ticket(cfg, Path(args.ticket), out, data, resolve_device(cfg.train.device), init)
    except KeyboardInterrupt:
        _interrupted(f"the same command (it continues from {out / CHECKPOINT_FILE})")
    if distributed.is_main():
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
    """Entry point of `ebtrain` and `python -m ebtrain`; returns the exit code. A process that joined
    torchrun's process group ends here with that code instead (see `distributed.end_process`)."""
    try:
        code = _command(list(sys.argv[1:] if argv is None else argv))
    finally:
        in_group = distributed.is_distributed()
        distributed.teardown()
    if in_group:
        distributed.end_process(code)
    return code


def _command(argv: list[str]) -> int:
    """Parse `argv`, join torchrun's process group if it started this process, and run the command;
    the exit code, with bad input and interruptions reported in one line."""
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "search")  # EB-Train is the default command
    retain_freed_memory()  # a CPU step reuses its buffers instead of faulting in fresh pages
    try:
        args = build_parser().parse_args(argv)
        if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise UserError(f"'ebtrain {args.command}' runs in one process: start it with python -m ebtrain, "
                            f"not torchrun (under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
        distributed.setup()  # under torchrun: join the other processes
        _run(args)
    except UserError as e:
        print(f"ebtrain: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # outside training (which names its batch sizes), e.g. moving the data
        print(f"ebtrain: error: out of GPU memory ({str(e).splitlines()[0]}): try a smaller --batch-size or "
              "--eval-batch-size, a smaller --width, or a --train-subset", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebtrain: interrupted; continue with --resume --out RUN_DIR", file=sys.stderr)
        return 130
    return 0

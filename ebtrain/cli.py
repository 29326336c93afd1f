"""The command line: parse, validate, call the pipeline. Thin by design.

    ebtrain [search] [flags]    EB-Train: search, prune and retrain every ticket, print the table
    ebtrain train [flags]       train the dense network (the baseline)
    ebtrain prune TICKET        write the physically pruned network of a ticket
    ebtrain retrain TICKET      train a ticket's pruned network through the rest of the schedule
    ebtrain lottery [flags]     lottery-ticket experiment: prune, reset, retrain, with controls
    ebtrain report RUN [RUN..]  one table across runs: accuracy, FLOPs, savings, seconds
    ebtrain report A B --tickets  how far the tickets of two runs agree, channel by channel
    ebtrain models              the registered architectures

Every command is one entry of COMMANDS: its help, its arguments, its handler. The commands that train
share one preparation (`_prepare`): settings, checks, device, data, run folder.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, NoReturn

import torch

from . import __version__, distributed
from .config import SECTIONS, Config, apply_overrides, field_type, fields_of, flag, load_yaml
from .data import DataBundle, load_data
from .errors import UserError
from .host_memory import retain_freed_memory
from .models import build_model, count_params, list_models, save_model
from .rundir import (CHECKPOINT_FILE, SUMMARY_FILE, config_to_resume, prepare_run_dir, pruned_model_file, retrain_dir,
                     run_of_ticket, saved_config)
from .tickets import load_ticket, pruned_from_ticket, ticket_label, ticket_name
from .train import resolve_device
from .validate import check_model, check_ticket_fits, check_ticket_names, validate


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
                group.add_argument(flag(f.name), nargs="+" if f.metadata["nonempty"] else "*", type=_number,
                                   metavar="X", **kwargs)
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


class Prepared(NamedTuple):
    """What a training command has once `_prepare` is done."""
    cfg: Config
    data: DataBundle
    device: torch.device
    run_dir: Path | None


def _prepare(args: argparse.Namespace, base: Config | None = None, *,
             check_settings: Callable[[Config], None] | None = None,
             check_data: Callable[[Config, DataBundle], None] | None = None, run_folder: bool = True) -> Prepared:
    """What every training command does before it trains, in an order that leaves nothing behind on bad input:
    the settings (`resolve_config`) and their checks, the device, the data (rank 0 first: it builds a dataset's
    cache), the checks of the settings against the data, and last the run folder (with `run_folder`)."""
    cfg = resolve_config(args, base)
    validate(cfg)
    if check_settings:
        check_settings(cfg)
    device = resolve_device(cfg.train.device)
    with distributed.main_first():
        data = load_data(cfg.data, seed=cfg.train.seed, device=device)
    if check_data:
        check_data(cfg, data)
    run_dir = None
    if run_folder:
        run_dir = prepare_run_dir(cfg)
        if distributed.is_main():
            print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    return Prepared(cfg, data, device, run_dir)


def _print_table(run_dir: Path) -> None:
    from .report import format_rows, run_rows
    rows = run_rows(run_dir)
    if rows:
        print(format_rows(rows), end="")


# ---- the commands -------------------------------------------------------------------------------
def _search(args: argparse.Namespace) -> None:
    from . import pipeline
    _run_job(pipeline.eb_train, "search", _prepare(args, check_settings=check_ticket_names,
                                                   check_data=partial(check_model, early_bird=True)))


def _train(args: argparse.Namespace) -> None:
    from . import pipeline
    _run_job(pipeline.dense_job, "train", _prepare(args, check_data=partial(check_model, early_bird=False)))


def _run_job(job: Callable[..., dict], command: str, p: Prepared) -> None:
    """Run a pipeline job (`eb_train`, `dense_job`) in its run folder, then print its table."""
    try:
        job(p.cfg, p.run_dir, p.data, p.device)
    except KeyboardInterrupt:
        _interrupted(f"python -m ebtrain {command} --resume --out {p.run_dir}")
    if distributed.is_main():
        _print_table(p.run_dir)
        print(f"summary: {p.run_dir / SUMMARY_FILE}", file=sys.stderr)


def _interrupted(how_to_continue: str) -> NoReturn:
    """Ctrl-C: the file being written was finished first (checkpoint.finishing_before_interrupt), so what
    is on disk is the last finished epoch; say how to go on and exit with 130, as shells do for SIGINT."""
    print(f"ebtrain: interrupted; continue with: {how_to_continue}", file=sys.stderr)
    raise SystemExit(130) from None


def _prune(args: argparse.Namespace) -> None:
    ticket = load_ticket(args.ticket)
    dense, pruned = pruned_from_ticket(ticket)
    default = pruned_model_file(args.ticket, ticket_name(ticket))
    out = Path(args.output) if args.output else default
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; name the file to write, e.g. {out / default.name}")
    save_model(pruned, out, ratio=ticket["ratio"], eb_epoch=ticket["epoch"])
    print(f"ticket {ticket_label(ticket)} drawn at epoch {ticket['epoch']}")
    print(f"{'layer':32s} {'dense':>6s} {'kept':>6s}")
    for name, total, kept in zip(ticket["layers"], ticket["dense_channels"], ticket["kept_channels"]):
        print(f"{name:32s} {total:6d} {kept:6d}")
    before, after = count_params(dense), count_params(pruned)
    print(f"parameters: {before:,d} -> {after:,d} ({100 * after / before:.1f}%)")
    print(f"pruned model: {out} (load with ebtrain.load_pruned)")


def _retrain(args: argparse.Namespace) -> None:
    from .pipeline import retrain_ticket
    ticket = load_ticket(args.ticket)
    # the ticket's own run settings (data, schedule) are the base, so a bare `retrain TICKET` matches it
    base = saved_config(run_of_ticket(args.ticket)) or Config()
    base.run.out = ""  # the run's own folder is not the retrain's; --out may still name one
    base.model.arch, base.model.width = ticket["arch"]["name"], ticket["arch"]["width"]  # the ticket's network

    def fits(cfg: Config, data: DataBundle) -> None:
        check_ticket_fits(cfg, data, ticket, args.ticket)
        check_model(cfg, data, early_bird=False)

    p = _prepare(args, base, check_data=fits, run_folder=False)
    search = p.cfg.search
    init = search.init
    drawn_at = ticket["epoch"] if ticket.get("drawn") else None
    out = Path(p.cfg.run.out) if p.cfg.run.out else retrain_dir(run_of_ticket(args.ticket), ticket_name(ticket), init,
                                                                 search.rewind_epoch, search.reinit_seed, drawn_at)
    try:
        result = retrain_ticket(p.cfg, Path(args.ticket), out, p.data, p.device, init)
    except KeyboardInterrupt:
        _interrupted(f"the same command (it continues from {out / CHECKPOINT_FILE})")
    if distributed.is_main():
        print(f"retrained {ticket_label(ticket)} ({init}): final test accuracy "
              f"{100 * result['final_test_acc']:.2f}%, best {100 * result['best_test_acc']:.2f}% -> {out}")


def _lottery(args: argparse.Namespace) -> None:
    from . import lottery
    p = _prepare(args, check_data=lottery.check_config)  # lottery.check_config before the run folder
    summary = lottery.run_lottery(p.cfg, p.run_dir, p.data, p.device)
    print(lottery.format_table(summary), end="")
    print(f"results: {p.run_dir / lottery.LOTTERY_FILE}, plots: {p.run_dir / 'lottery_accuracy.png'}, "
          f"{p.run_dir / 'lottery_early_stop.png'}", file=sys.stderr)


def _report(args: argparse.Namespace) -> None:
    from .report import (format_agreement, format_rows, plot_acc_vs_flops, plot_drawing_epochs, run_rows,
                         ticket_agreement_rows)
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
    if args.draw_plot:
        plot_drawing_epochs(args.runs, args.draw_plot)
        print(f"plot: {args.draw_plot}", file=sys.stderr)


def _models(args: argparse.Namespace) -> None:
    names = list_models()
    for name in names:
        n = count_params(build_model(name, num_classes=args.num_classes, width=args.width))
        print(f"{name:{max(map(len, names))}s} {n:>12,d} parameters")


# ---- the command table ----------------------------------------------------------------------------
def _ticket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ticket", help="a ticket file, RUN/tickets/pNN.pt")


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    _ticket_argument(parser)
    parser.add_argument("--output", help="where to write the pruned model (default: next to the ticket)")


def _retrain_arguments(parser: argparse.ArgumentParser) -> None:
    _ticket_argument(parser)
    _add_config_flags(parser)


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--format", default="text", choices=("text", "markdown", "csv", "json"))
    parser.add_argument("--plot", metavar="PATH", help="also write test accuracy against training FLOPs as a PNG")
    parser.add_argument("--draw-plot", metavar="PATH", help="also write, for runs with --draw-epochs, retrained "
                        "accuracy against the epoch each ticket was drawn at as a PNG, one panel per run")
    parser.add_argument("--tickets", action="store_true",
                        help="instead, compare the tickets of two runs: channels on which their masks agree, per ratio")


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=10)


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments to its parser
    run: Callable[[argparse.Namespace], None]
    distributed: bool = False  # runs under torchrun


COMMANDS: dict[str, Command] = {  # the first is the default
    "search": Command("EB-Train: search, prune and retrain every ticket (the default)", _add_config_flags, _search,
                      distributed=True),
    "train": Command("train the dense network for the full schedule (the baseline)", _add_config_flags, _train,
                     distributed=True),
    "prune": Command("write the physically pruned network of a ticket", _prune_arguments, _prune),
    "retrain": Command("train a ticket's pruned network through the rest of the schedule", _retrain_arguments,
                       _retrain, distributed=True),
    "lottery": Command("lottery-ticket experiment: iterative magnitude pruning with resetting, random-reinit and "
                       "random-pruning controls, several seeds", _add_config_flags, _lottery),
    "report": Command("one table across runs: accuracy, training FLOPs, savings, seconds", _report_arguments, _report),
    "models": Command("list the registered architectures with parameter counts", _models_arguments, _models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ebtrain", description="Find Early-Bird tickets and train them.")
    parser.add_argument("--version", action="version", version=f"ebtrain {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return parser


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
        argv.insert(0, next(iter(COMMANDS)))  # EB-Train is the default command
    retain_freed_memory()  # a CPU step reuses its buffers instead of faulting in fresh pages
    try:
        args = build_parser().parse_args(argv)
        command = COMMANDS[args.command]
        if distributed.launched() and not command.distributed:
            under = ", ".join(name for name, c in COMMANDS.items() if c.distributed)
            raise UserError(f"'ebtrain {args.command}' runs in one process: start it with python -m ebtrain, "
                            f"not torchrun (under torchrun: {under})")
        distributed.setup()  # under torchrun: join the other processes
        command.run(args)
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

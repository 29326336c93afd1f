"""Reproduce the Early-Bird paper's CIFAR-10 comparison: dense, EB-Train and EB re-init at p = 0.3, 0.5, 0.7.

    python scripts/reproduce_eb.py --dataset imagefolder --data-dir cifar10 --time-budget 540
    python scripts/reproduce_eb.py --arch preresnet101 --dataset imagefolder --data-dir cifar10 --time-budget 540

Run the same command again until it writes the table: every step is the `python -m ebtrain` command a
user would type, skipped when its result is on disk and otherwise started or continued.
  1. EB-Train and the dense baseline, in OUT/eb: `ebtrain search --baseline --out OUT/eb [flags]` searches,
     prunes and retrains every ticket from its Early-Bird weights, then trains the dense network for the
     full schedule. Done when OUT/eb/summary.json exists; continued with `ebtrain search --resume`.
  2. EB re-init of every ticket: `ebtrain retrain OUT/eb/tickets/pNN.pt --init reinit`, the same pruned
     network from fresh weights for the full schedule. Done when OUT/eb/retrain/pNN-reinit/result.json
     exists; a retrain continues from its own checkpoint.
  3. OUT/table.md: the table of `ebtrain report OUT/eb --format markdown` (accuracy, EB epoch, training
     FLOPs and savings, seconds) beside what the paper reports, and OUT/acc_vs_flops.png.
Flags this script does not know (--dataset, --data-dir, --epochs, --width, --ratios, --train-subset,
--round-channels, ...) go to step 1 as they are; the defaults are the paper's recipe (CIFAR-10, 160
epochs, p = 0.3, 0.5, 0.7, eps 0.1). A run continued in step 1 keeps the settings it was started with.

With --time-budget SECONDS the ebtrain command running when the budget is spent gets SIGINT (as from
Ctrl-C): every file it writes is atomic, so its last finished epoch stays on disk, and it exits. This
script then says to run it again and exits with code 75, so a reproduction runs as a series of commands
of bounded length (the epoch in progress at the interruption is trained again by the next command).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout, uninstalled

from ebtrain.report import format_rows, plot_acc_vs_flops, read_summary, run_rows  # noqa: E402
from ebtrain.rundir import CONFIG_FILE, SUMMARY_FILE  # noqa: E402

UNFINISHED = 75  # sysexits' EX_TEMPFAIL: stopped by the time budget, run again to continue
GRACE_SECONDS = 120  # how long an interrupted ebtrain may take to exit before it is killed
# What You et al. (ICLR 2020, arXiv 1909.11957) report that this table checks. The per-ratio accuracies
# of the paper's tables are not copied here: figures not verified against the paper are left out.
PAPER = {
    "source": "You et al., Drawing Early-Bird Tickets, ICLR 2020 (arXiv 1909.11957)",
    "savings": "EB-Train trains VGG16 and PreResNet101 on CIFAR-10/100 with 2.2x to 2.4x fewer training FLOPs "
               "than the dense network, at comparable accuracy",
    "vgg16_forward_multiply_adds": 3.13e8,
}


class Interrupted(Exception):
    """The time budget ran out (or Ctrl-C came) while an ebtrain command was running."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Every other flag is passed to `ebtrain search` as it is.")
    p.add_argument("--arch", default="vgg16", help="vgg16 (the paper's table) or preresnet101")
    p.add_argument("--out", help="folder of the reproduction (default: runs/reproduce-ARCH)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop cleanly after this many seconds; run again to continue")
    args, ebtrain_flags = p.parse_known_args(argv)
    args.out = Path(args.out or f"runs/reproduce-{args.arch}")
    return args, ebtrain_flags


def run_ebtrain(flags: list[str], deadline: float | None) -> None:
    """Run `python -m ebtrain FLAGS`; at `deadline` (time.monotonic()) interrupt it and raise Interrupted."""
    if deadline is not None and time.monotonic() >= deadline:
        raise Interrupted
    print("$ " + shlex.join(["python", "-m", "ebtrain", *flags]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # the budget stops ebtrain with SIGINT, which a process started in the background (nohup, &) would
    # otherwise inherit as ignored: the child gets Python's own Ctrl-C handling back
    child = subprocess.Popen([sys.executable, "-m", "ebtrain", *flags], env=env, preexec_fn=_hear_sigint)
    try:
        code = child.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)
        _wait_or_kill(child)
        raise Interrupted from None
    except KeyboardInterrupt:  # Ctrl-C reached ebtrain as well
        _wait_or_kill(child)
        raise Interrupted from None
    if code != 0:
        raise SystemExit(f"reproduce_eb: `python -m ebtrain {shlex.join(flags)}` failed (exit code {code})")


def _hear_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_or_kill(child: subprocess.Popen) -> None:
    try:
        child.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:  # its files are written atomically, so even this loses no finished epoch
        child.kill()
        child.wait()


def eb_train_and_baseline(run: Path, arch: str, flags: list[str], deadline: float | None) -> None:
    """Step 1: search, EB-Train every ticket, and the dense baseline, in `run`."""
    if (run / SUMMARY_FILE).is_file():
        return
    if (run / CONFIG_FILE).is_file():
        run_ebtrain(["search", "--resume", "--out", str(run)], deadline)
    else:
        run_ebtrain(["search", "--arch", arch, "--baseline", "--out", str(run), *flags], deadline)


def eb_reinit(run: Path, deadline: float | None) -> None:
    """Step 2: every ticket's pruned network trained from fresh weights for the full schedule."""
    for ticket in sorted((run / "tickets").glob("p*.pt")):
        if not (run / "retrain" / f"{ticket.stem}-reinit" / "result.json").is_file():
            run_ebtrain(["retrain", str(ticket), "--init", "reinit"], deadline)


def write_table(out: Path, run: Path) -> Path:
    """Step 3: OUT/table.md (the report's markdown table and the paper's figures) and the plot."""
    summary = read_summary(run)
    plot = out / "acc_vs_flops.png"
    plot_acc_vs_flops([run], plot)
    text = (f"# Early-Bird tickets: {summary['arch']} (width {summary['width']:g}) on {summary['dataset']}, "
            f"{summary['epochs']} epochs\n\n"
            f"{format_rows(run_rows(run), 'markdown')}\n"
            f"`savings`: the dense baseline's training FLOPs / the row's; `savings_paper` counts a training step "
            f"as 3 x forward, as the paper does. Test accuracy against training FLOPs: {plot.name}.\n\n"
            f"The paper ({PAPER['source']}): {PAPER['savings']}. It counts VGG16 at "
            f"{PAPER['vgg16_forward_multiply_adds']:.3g} multiply-adds per forward pass of a CIFAR image.\n")
    path = out / "table.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run or continue every step; 0 when the table is written, UNFINISHED when the budget ran out."""
    args, flags = parse_args(argv)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    run = args.out / "eb"
    try:
        eb_train_and_baseline(run, args.arch, flags, deadline)
        eb_reinit(run, deadline)
    except Interrupted:
        print(f"reproduce_eb: stopped before the end (time budget or Ctrl-C); every finished epoch is in "
              f"{args.out}: run me again to continue", flush=True)
        return UNFINISHED
    table = write_table(args.out, run)
    print(table.read_text(), end="")
    print(f"table: {table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every CUDA path of ebtrain end to end on small data, in one command: a PASS or FAIL line per check.

    python scripts/gpu_check.py OUT                 # everything under OUT; about 5 minutes on one GPU
    python scripts/gpu_check.py OUT --skip bench     # without the speed benchmark
    python scripts/gpu_check.py OUT --device cpu     # the script's own logic, on a machine without a GPU

CI has no GPU, so this is how the GPU side is checked: on a machine with one, run it and read
OUT/gpu_check.json (each check's command, exit code, seconds and what was checked), OUT/logs/NAME.log
(each command's output) and OUT/bench_train.json. Every check is the `python -m ebtrain` command a
user would type, on synthetic CIFAR-sized images:
  search_fp32_eager, search_fp32_captured    the search with the eager and the captured (compiled) step
  search_bfp8_eager, search_bfp8_captured    the same in simulated 8-bit block floating point
  prune, retrain_eb, retrain_reinit, retrain_rewind    the fp32 search's p50 ticket
  torchrun_one_process                       the search under torchrun, one NCCL process, --sync-bn
  lottery_batched                            a lottery experiment on the batched population engine
  resume_cpu_to_cuda, resume_cuda_to_cpu     a bfp8 search interrupted (SIGINT) after its first
                                             checkpoint and resumed on the other device
  deterministic_repeat                       two --deterministic runs give the same metrics, bit for bit
  bench                                      scripts/bench_train.py, VGG16, eager and captured, p70
Independent checks run --jobs at a time (default 4: the machine's GPU is far from full with them); the
bench runs alone at the end, so its timings are the device's own.
Exit code: 0 if every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--dataset", "synthetic", "--synthetic-size", "2048", "--image-size", "32", "--num-classes", "10",
        "--batch-size", "128", "--progress", "off"]
SEARCH = [*DATA, "--arch", "vgg16", "--width", "0.25", "--epochs", "6", "--ratios", "0.3", "0.5", "0.7",
          "--eps", "0.9", "--queue-length", "2", "--no-retrain"]


class Checks:
    """Runs commands, one check each, and keeps what came of them."""

    def __init__(self, out: Path, skip: set[str], device: str):
        self.out, self.skip, self.device = out, skip, device
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.after_each = lambda: None  # called after each check, under the lock
        self.lock = threading.Lock()

    def command(self, name: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `args` (a python -m ebtrain command when it starts with a flag or subcommand), output to the log."""
        cmd = args if args[0] == sys.executable else [sys.executable, "-m", "ebtrain", *args]
        trains = "ebtrain" in cmd and cmd[cmd.index("ebtrain") + 1] in ("search", "train", "retrain", "lottery")
        if trains and "--device" not in cmd and "--resume" not in cmd:
            cmd = [*cmd, "--device", self.device]
        with open(self.out / "logs" / f"{name}.log", "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def check(self, name: str, run) -> None:
        """`run()` returns what was checked (a dict); an exception or a false `ok` in it fails the check."""
        if name in self.skip:
            return
        started = time.perf_counter()
        try:
            found = run()
            ok = found.pop("ok", True)
        except Exception as e:  # a check fails; the others still run
            found, ok = {"error": f"{type(e).__name__}: {e}"}, False
        seconds = time.perf_counter() - started
        with self.lock:
            self.results.append({"name": name, "passed": ok, "seconds": round(seconds, 1), **found})
            print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.0f}s){'' if ok else ': ' + json.dumps(found)}",
                  flush=True)
            self.after_each()

    def ebtrain(self, name: str, args: list[str], timeout: float = 300) -> dict:
        proc = self.command(name, args, timeout)
        return {"ok": proc.returncode == 0, "returncode": proc.returncode, "command": " ".join(args)}


def _result(path: Path) -> dict:
    return json.loads(path.read_text())


def search(checks: Checks, name: str, flags: list[str]) -> dict:
    """A search that must draw all three tickets and say whether its step was compiled."""
    run = checks.out / name
    found = checks.ebtrain(name, ["search", *SEARCH, *flags, "--out", str(run)])
    if found["ok"]:
        result = _result(run / "search" / "result.json")
        found.update(tickets=sorted(result["tickets"]), compiled=result["compiled"],
                     compile_seconds=result["compile_seconds"], seconds=result["seconds"],
                     test_acc=result["final_test_acc"])
        found["ok"] = found["tickets"] == ["p30", "p50", "p70"] and found["compiled"] == ("off" not in flags)
    return found


def retrain(checks: Checks, init: str) -> dict:
    ticket = checks.out / "search_fp32_eager" / "tickets" / "p50.pt"
    out = checks.out / f"retrain_{init}"
    found = checks.ebtrain(f"retrain_{init}", ["retrain", str(ticket), "--init", init, "--out", str(out)])
    if found["ok"]:
        result = _result(out / "result.json")
        found.update(test_acc=result["final_test_acc"], epochs=result["epochs_trained"],
                     round_channels=result["round_channels"], compiled=result["compiled"])
    return found


def resume_on_other_device(checks: Checks, name: str, first: str, second: str) -> dict:
    """A bfp8 search on `first`, interrupted once its first checkpoint is on disk, resumed on `second`."""
    run = checks.out / name
    args = ["search", *DATA, "--arch", "vgg11", "--width", "0.125", "--epochs", "8", "--eps", "0.01",
            "--no-retrain", "--precision", "bfp8", "--compile", "off", "--device", first, "--out", str(run)]
    cmd = [sys.executable, "-m", "ebtrain", *args]
    with open(checks.out / "logs" / f"{name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 120
        while not (run / "search" / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        interrupted = proc.wait(60)
    found = checks.ebtrain(name, ["search", "--resume", "--out", str(run), "--device", second])
    found["interrupted_exit"] = interrupted
    if found["ok"]:
        result = _result(run / "search" / "result.json")
        found.update(epochs=result["epochs_trained"], last_epoch=result["last_epoch"])
        found["ok"] = interrupted == 130  # and the resumed search finished
    return found


def deterministic_repeat(checks: Checks) -> dict:
    metrics = []
    for i in (1, 2):
        out = checks.out / f"deterministic_{i}"
        found = checks.ebtrain("deterministic_repeat", ["train", *DATA, "--arch", "vgg16", "--width", "0.25",
                                                        "--epochs", "2", "--deterministic", "--out", str(out)])
        if not found["ok"]:
            return found
        metrics.append([(m["train_loss"], m["test_loss"]) for m in map(json.loads, (out / "metrics.jsonl")
                                                                          .read_text().splitlines())])
    return {"ok": metrics[0] == metrics[1], "losses": metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for every run, log and the JSON summary (created)")
    p.add_argument("--skip", nargs="+", default=[], help="names of checks to leave out")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: run the checks on the CPU (resuming on the CPU too), to test this script")
    p.add_argument("--jobs", type=int, default=4, help="independent checks run at once (the bench runs alone, last)")
    args = p.parse_args(argv)
    out = Path(args.out)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: gpu_check checks the GPU side (--device cpu runs its checks on the CPU)",
              file=sys.stderr)
        return 2
    other = "cpu"  # the device a run moves to and from; with --device cpu both ends are the CPU
    checks = Checks(out, set(args.skip), args.device)
    ticket = out / "search_fp32_eager" / "tickets" / "p50.pt"
    sync_bn = ["--sync-bn"] if args.device == "cuda" else []  # SyncBatchNorm is for GPUs
    chains = [  # each chain's checks run in order; chains are independent of each other
        [("search_fp32_eager", lambda: search(checks, "search_fp32_eager", ["--compile", "off"])),
         ("prune", lambda: checks.ebtrain("prune", ["prune", str(ticket), "--output", str(out / "p50-pruned.pt")])),
         *[(f"retrain_{init}", lambda init=init: retrain(checks, init)) for init in ("eb", "reinit", "rewind")]],
        [("search_fp32_captured", lambda: search(checks, "search_fp32_captured", []))],
        [("search_bfp8_eager", lambda: search(checks, "search_bfp8_eager", ["--precision", "bfp8", "--compile", "off"]))],
        [("search_bfp8_captured", lambda: search(checks, "search_bfp8_captured", ["--precision", "bfp8"]))],
        [("torchrun_one_process", lambda: checks.ebtrain("torchrun_one_process", [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ebtrain",
            "search", *SEARCH, *sync_bn, "--compile", "off", "--out", str(out / "torchrun_one_process")]))],
        [("lottery_batched", lambda: checks.ebtrain("lottery_batched", [
            "lottery", "--dataset", "synthetic", "--synthetic-size", "1024", "--image-size", "28", "--channels", "1",
            "--arch", "lenet300_100", "--optimizer", "adam", "--lr", "0.0012", "--batch-size", "60", "--val-size",
            "128", "--iterations", "200", "--eval-every", "50", "--rounds", "2", "--seeds", "2", "--progress", "off",
            "--out", str(out / "lottery_batched")]))],
        [("resume_cpu_to_cuda", lambda: resume_on_other_device(checks, "resume_cpu_to_cuda", other, args.device)),
         ("resume_cuda_to_cpu", lambda: resume_on_other_device(checks, "resume_cuda_to_cpu", args.device, other))],
        [("deterministic_repeat", lambda: deterministic_repeat(checks))],
    ]
    order = [name for chain in chains for name, _ in chain] + ["bench"]
    started = time.perf_counter()

    def write_summary() -> dict:
        """The summary so far (after every check, so a killed run keeps what it found)."""
        results = sorted(checks.results, key=lambda r: order.index(r["name"]))
        passed = sum(r["passed"] for r in results)
        summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "torch": torch.__version__, "cuda": torch.version.cuda, "jobs": args.jobs,
                   "passed": passed, "failed": len(results) - passed,
                   "seconds": round(time.perf_counter() - started, 1), "checks": results}
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    checks.after_each = write_summary
    with ThreadPoolExecutor(args.jobs) as pool:  # the checks themselves are subprocesses
        for done in [pool.submit(lambda chain=chain: [checks.check(name, run) for name, run in chain])
                     for chain in chains]:
            done.result()
    checks.check("bench", lambda: checks.ebtrain("bench", [  # alone on the device, so its timings are clean
        sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--arch", "vgg16", "--ratios", "0.7",
        "--steps", "30", "--device", args.device, "--out", str(out / "bench_train.json")], timeout=600))
    summary = write_summary()
    print(f"{summary['passed']} passed, {summary['failed']} failed in {summary['seconds']:.0f}s -> "
          f"{out / 'gpu_check.json'}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

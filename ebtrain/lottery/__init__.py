"""Lottery-ticket experiments (Frankle & Carbin, 2019), and IMP channel tickets to set beside Early-Bird
tickets. `ebtrain lottery` calls the three entry points below; the modules, top to bottom:

    experiment.py   the rounds of train, prune, reset, with controls; resume; lottery.json
    pruning.py      pruning strategies: unstructured weights, or BatchNorm channels
    masks.py        weight masks: magnitude, random, applied, density
    population.py   K networks trained in lockstep, batched into one model where the architecture allows
    sparse.py       a batched input layer held block-sparse (late rounds, on the CPU)
    analyses.py     statistics over seeds, mask overlap, weight movement, comparison with an EB ticket
    figures.py      the run's plots and the table the CLI prints
"""
from ..rundir import LOTTERY_FILE
from .experiment import check_config, run_lottery
from .figures import format_table

__all__ = ["LOTTERY_FILE", "check_config", "format_table", "run_lottery"]

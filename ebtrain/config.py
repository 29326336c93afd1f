"""Every setting of ebtrain as typed dataclasses, one help string per field.

Defaults are the Early-Bird paper's recipe for VGG16 on CIFAR-10. A run's settings resolve as
defaults < `--config FILE` (YAML, sections named like the dataclasses below) < command-line flags, and
the resolved config is written to the run directory, so `--config RUN/config.yaml` re-runs it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass(frozen=True)
class Bounds:
    """The numbers a setting allows: an interval written as in mathematics, "(0, 1)", "[2, 24]", "[0, inf)",
    and values outside it that mean something else (`also`: -1 for 'take another setting's value')."""
    interval: str
    also: tuple = ()

    @property
    def ends(self) -> tuple[float, float]:
        low, high = self.interval[1:-1].split(",")
        return float(low), float(high)

    def allows(self, value: float) -> bool:
        low, high = self.ends
        above = value > low if self.interval[0] == "(" else value >= low
        below = value < high if self.interval[-1] == ")" else value <= high
        return (above and below) or value in self.also

    def rule(self, whole: bool) -> str:
        """The rule in words, for an error message; `whole`: the setting takes whole numbers."""
        low, high = self.ends
        if high == math.inf and self.interval[0] == "[":
            text = "must be 0 or more" if low == 0 else f"must be at least {low:g}"
        elif high == math.inf and low == 0:
            text = "must be positive" if whole else "must be a positive number"
        else:
            text = f"must lie in {self.interval}"
        return text + "".join(f", or {v:g}" for v in self.also)


def _field(default: Any, help: str, choices: tuple | None = None, within: str | None = None,
           also: tuple = (), nonempty: bool = False) -> Any:
    """A setting: its default, its help text, and what it allows: `choices`, or numbers `within` an interval
    (each number of a list; `nonempty`: the list needs one) plus the special values `also`."""
    meta = {"help": help, "choices": choices, "bounds": Bounds(within, also) if within else None,
            "nonempty": nonempty}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# The multiple `--round-channels 0` rounds pruned layers to on CUDA: measured on an H200 (bench_train),
# tickets rounded to 8 channels stepped 1.16x to 1.27x faster than dense where unrounded ones did not.
GPU_ROUND_CHANNELS = 8

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "imagenet", "digits", "synthetic")
# The side `--image-size 0` means: ImageNet's crop, and CIFAR's for everything else.
DEFAULT_IMAGE_SIZE = {"imagenet": 224}


@dataclass
class DataConfig:
    dataset: str = _field("cifar10", "dataset name", DATASETS)
    data_dir: str = _field("data", "where datasets live (for imagefolder: the folder holding train/ and test/; for "
                           "imagenet: train/ and val/, each with one folder of images per class)")
    download: bool = _field(False, "download torchvision datasets that are missing from data_dir")
    train_subset: int = _field(0, "use only the first N training images of a seeded shuffle (0: all)",
                               within="[0, inf)")
    val_size: int = _field(0, "hold out N training images as a validation split (0: none)", within="[0, inf)")
    augment: str = _field("auto", "random crop with padding and horizontal flip (streamed image folders: random "
                          "resized crop and flip): auto (on for CIFAR-like colour data and streamed folders), on, "
                          "off", ("auto", "on", "off"))
    synthetic_size: int = _field(512, "synthetic dataset: number of training images (test: a quarter)",
                                 within="[1, inf)")
    image_size: int = _field(0, "synthetic dataset: image side in pixels; a streamed image folder: the side of "
                             "the crop every image is trained and evaluated at (0: 224 for imagenet, 32 otherwise)",
                             within="[1, inf)", also=(0,))
    num_classes: int = _field(10, "synthetic dataset: number of classes", within="[2, inf)")
    channels: int = _field(3, "synthetic dataset: image channels", within="[1, inf)")
    loader: str = _field("auto", "image folders: memory (decode once, hold every image on the training device), "
                         "stream (decode each batch from disk in --workers processes: random resized crop and flip "
                         "for training, resize and center crop to --image-size for evaluation), auto (imagenet: "
                         "stream; imagefolder: stream when the images differ in size or would take over a quarter "
                         "of RAM, or of GPU memory on CUDA, decoded)", ("auto", "memory", "stream"))
    workers: int = _field(-1, "streaming loader: decoding processes per split (0: decode in the training process; "
                          "-1: min(8, CPU count))", within="[0, inf)", also=(-1,))


@dataclass
class ModelConfig:
    arch: str = _field("vgg16", "architecture name (see `ebtrain models`)")
    width: float = _field(1.0, "channel-width multiplier, e.g. 0.25 for CPU-sized runs", within="(0, inf)")


@dataclass
class TrainConfig:
    epochs: int = _field(160, "total training epochs of the dense schedule", within="(0, inf)")
    batch_size: int = _field(256, "training batch size (under torchrun the global batch, split evenly among "
                             "the processes)", within="(0, inf)")
    optimizer: str = _field("sgd", "optimizer", ("sgd", "adam"))
    lr: float = _field(0.1, "initial learning rate", within="(0, inf)")
    momentum: float = _field(0.9, "SGD momentum", within="[0, 1)")
    weight_decay: float = _field(1e-4, "weight decay", within="[0, inf)")
    milestones: list = _field([0.5, 0.75], "epochs at which the learning rate is multiplied by gamma; "
                              "values below 1 are fractions of the epochs")
    gamma: float = _field(0.1, "learning-rate decay factor at each milestone", within="(0, inf)")
    warmup_iter: int = _field(0, "linear learning-rate warmup over the first N training steps: at step t (0-based; "
                              "counted from the start of the schedule, in the lottery from the start of each "
                              "training) the rate is the schedule's times min(1, (t + 1) / N) (0: no warmup)",
                              within="[0, inf)")
    seed: int = _field(1, "random seed for initialization and data order")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    compile: str = _field("auto", "compile the training step (forward with the loss, backward, the update with its "
                          "hooks) and evaluation with torch.compile; on CUDA it is captured as CUDA graphs and "
                          "replayed, so a step does not pay per-kernel launch overhead: auto (on with CUDA, off on "
                          "the CPU), on, off (the eager step, for debugging)", ("auto", "on", "off"))
    deterministic: bool = _field(False, "on CUDA: deterministic cuDNN and cuBLAS algorithms, so a run repeats bit "
                                 "for bit (slower); on the CPU runs repeat exactly anyway")
    sync_bn: bool = _field(False, "under torchrun on GPUs: BatchNorm statistics of the whole global batch "
                           "(SyncBatchNorm) rather than of each GPU's share")
    eval_batch_size: int = _field(1024, "batch size for evaluation", within="(0, inf)")


@dataclass
class SearchConfig:
    ratios: list = _field([0.3, 0.5, 0.7], "channel pruning ratios to draw Early-Bird tickets for (tickets p30, "
                          "...); may be empty (a bare --ratios) when --flops-targets are given", within="(0, 1)")
    flops_targets: list = _field([], "fractions of the dense network's forward FLOPs per image to draw Early-Bird "
                                 "tickets for (tickets f50, ...): each mask keeps the highest-|gamma| channels whose "
                                 "pruned network costs at most that fraction, counted exactly; beside --ratios",
                                 within="(0, 1)")
    eps: float = _field(0.1, "mask-distance threshold below which a ticket has emerged", within="(0, 1)")
    queue_length: int = _field(5, "number of recent mask distances the detector looks at", within="[2, inf)")
    eb_rule: str = _field("paper", "paper: max of the FIFO queue of consecutive-epoch distances below eps; "
                          "reference: newest mask within eps of each older mask in the window",
                          ("paper", "reference"))
    min_keep: float = _field(0.0, "fraction of each prunable layer's channels that every mask keeps, its "
                             "highest-scored ones, with the rest of the ratio's pruning taken from the other "
                             "layers (0: the paper's global ranking, which keeps at least one per layer)",
                             within="[0, 1)")
    sparsity: float = _field(1e-4, "L1 penalty on the prunable BatchNorm weights during the search (0: off)",
                             within="[0, inf)")
    sparsity_weight: str = _field("uniform", "weight of each channel's L1 penalty: uniform (the paper's), or flops "
                                  "(MorphNet's FLOPs regularizer: scaled by the forward FLOPs the channel costs in "
                                  "the dense network, normalized to a mean of 1 over all prunable channels)",
                                  ("uniform", "flops"))
    max_search_epochs: int = _field(0, "stop searching after this many epochs (0: the whole schedule)",
                                    within="[0, inf)")
    precision: str = _field("fp32", "arithmetic of the search: fp32, or bfp8 (simulated block floating point "
                            "with stochastic rounding on weights, activations, gradients, errors and momentum; "
                            "BatchNorm stays fp32); retraining is always fp32", ("fp32", "bfp8"))
    bits: int = _field(8, "word length of the block floating point numbers with --precision bfp8 (2 to 24)",
                       within="[2, 24]")
    retrain: bool = _field(True, "after the search, prune and retrain every ticket")
    init: str = _field("eb", "weights the pruned network starts from: eb (the Early-Bird weights), reinit "
                       "(fresh random weights, full schedule), rewind (the kept weights of --rewind-epoch)",
                       ("eb", "reinit", "rewind"))
    rewind_epoch: int = _field(0, "the search saves the dense weights of epoch K (RUN/rewindK.pt; 0: the "
                               "initialization, RUN/init.pt, always saved), and --init rewind resets the kept "
                               "weights to them and trains global epochs K+1 to the end, the learning rate "
                               "continuing the schedule from epoch K (late rewinding); K at most the ticket's "
                               "EB epoch", within="[0, inf)")
    reinit_seed: int = _field(-1, "seed of --init reinit's fresh weights (-1: derived from --seed, one that "
                              "differs from the dense initialization's)", within="[0, 4294967295]",
                              also=(-1,))
    round_channels: int = _field(0, "round each layer of a pruned network up to a multiple of N channels (at most "
                                 "its dense size), keeping again its highest-scored pruned channels, so tensor "
                                 "cores stay efficient; the Early-Bird mask is unchanged (1: no rounding; 0: auto, "
                                 f"{GPU_ROUND_CHANNELS} when training on CUDA, 1 elsewhere)", within="[0, inf)")
    draw_epochs: list = _field([], "also draw every ratio's ticket at each of these epochs of the search, whatever "
                               "the detector says, and retrain it like an Early-Bird ticket (tickets pNN-eE): "
                               "how good tickets drawn that early are; the search runs at least to the last one")
    baseline: bool = _field(False, "also train the dense network for the full schedule, for comparison")


@dataclass
class LotteryConfig:
    rounds: int = _field(14, "pruning rounds after the dense training (round 0); 14 rounds at rate 0.2 leave "
                         "4.4 percent of the weights", within="[1, inf)")
    rate: float = _field(0.2, "fraction of the remaining weights pruned in each round (with --structured: of "
                         "the remaining channels; with --global-pruning: of all remaining weights)", within="(0, 1)")
    conv_rate: float = _field(-1.0, "per-round pruning rate of conv layers (-1: --rate)", within="[0, 1)", also=(-1,))
    fc_rate: float = _field(-1.0, "per-round pruning rate of hidden fully connected layers (-1: --rate)",
                            within="[0, 1)", also=(-1,))
    output_rate: float = _field(-1.0, "per-round pruning rate of the output layer (-1: half the fc rate)",
                                within="[0, 1)", also=(-1,))
    global_pruning: bool = _field(False, "rank the weights of all layers together (one magnitude threshold, "
                                  "--rate of the remaining weights per round) instead of pruning each layer at its "
                                  "own rate; a layer whose rate is 0 (e.g. --output-rate 0) is left out of the "
                                  "ranking and keeps all its weights")
    one_shot: bool = _field(False, "prune the trained dense network straight to each round's sparsity instead "
                            "of pruning the previous round's ticket")
    rewind_iter: int = _field(0, "reset kept weights to their values at this iteration of the dense training "
                              "(0: the initialization)")
    iterations: int = _field(50000, "training iterations of every network in every round", within="[1, inf)")
    eval_every: int = _field(100, "iterations between validation-loss evaluations (early stopping)")
    seeds: int = _field(1, "independent runs, seeds train.seed, train.seed + 1, ...", within="[1, inf)")
    reinit: bool = _field(True, "control: the ticket's mask with fresh random weights")
    random_prune: bool = _field(True, "control: a random mask with the ticket's per-layer sparsity")
    structured: bool = _field(False, "prune channels by BatchNorm weight (Early-Bird masks) instead of single "
                              "weights")
    eb_ticket: str = _field("", "with --structured: an Early-Bird ticket (RUN/tickets/pNN.pt, same arch and "
                            "seed) whose channel mask each round's ticket is compared with")
    batched: bool = _field(True, "train the arms and seeds of a round as one batched model (architectures "
                           "without BatchNorm)")


@dataclass
class RunConfig:
    out: str = _field("", "run directory (default: runs/<arch>-<dataset>-<time>)")
    runs_dir: str = _field("runs", "parent folder of run directories named by default")
    resume: bool = _field(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _field(False, "allow writing into a run directory that already finished")
    tensorboard: bool = _field(True, "write TensorBoard event files")
    progress: str = _field("auto", "progress bars: auto (when output is a terminal), on, off",
                           ("auto", "on", "off"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    lottery: LotteryConfig = field(default_factory=LotteryConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else globals()[f.type]
                             for f in dataclasses.fields(Config)}


def fields_of(section: str) -> tuple[dataclasses.Field, ...]:
    """The fields of one config section, e.g. fields_of("train")."""
    return dataclasses.fields(SECTIONS[section])


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a field's value (its annotation is a string under postponed evaluation)."""
    return {"str": str, "int": int, "float": float, "bool": bool, "list": list}[f.type]


def flag(name: str) -> str:
    """The command-line flag of a setting: 'eb_rule' -> '--eb-rule'."""
    return "--" + name.replace("_", "-")


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def coerce(section: str, name: str, value: Any) -> Any:
    """Check and convert one value for field `section.name`; raises UserError naming what is allowed."""
    f = next(f for f in fields_of(section) if f.name == name)
    kind = field_type(f)
    where = f"{section}.{name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} = {value!r} is not allowed: expected true or false")
    if kind is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return [v if isinstance(v, int) else float(v) for v in items]
        raise UserError(f"{where} = {value!r} is not allowed: expected a list of numbers")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"{where} = {value!r} is not allowed: expected a whole number")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} = {value!r} is not allowed: expected a number")
        return float(value)
    choices = f.metadata.get("choices")
    if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where} = {value!r} is not allowed: "
                        + (f"choose from {', '.join(choices)}" if choices else "expected text"))
    value = str(value)
    rule = _broken_rule(f, value)
    if rule:
        raise UserError(f"{where} = {value!r} is not allowed: {rule}" + _closest(value, choices))
    return value


def check_allowed(settings: Any) -> None:
    """Check that every setting of `settings` (a Config, or one section such as a DataConfig) is one its field
    allows: one of its choices, a number within its bounds. Raises UserError naming the first that is not,
    by its flag. Settings read from a file or the command line pass `coerce` first, which checks types."""
    sections = [getattr(settings, s) for s in SECTIONS] if isinstance(settings, Config) else [settings]
    for section in sections:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            rule = _broken_rule(f, value)
            if rule:
                shown = " ".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
                raise UserError(f"{flag(f.name)} {shown}".rstrip() + f": {rule}")


def _broken_rule(f: dataclasses.Field, value: Any) -> str | None:
    """The rule of field `f` that `value` breaks, in words; None if it keeps them all."""
    choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
    if choices and value not in choices:
        return f"choose from {', '.join(choices)}"
    if isinstance(value, list):
        if f.metadata.get("nonempty") and not value:
            return f"give at least one value{f' in {bounds.interval}' if bounds else ''}"
        if bounds and not all(bounds.allows(v) for v in value):
            return "each " + bounds.rule(whole=False)
    elif bounds and not bounds.allows(value):
        return bounds.rule(whole=field_type(f) is int)
    return None


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Return a copy of `cfg` with {section: {field: value}} applied; unknown names raise UserError."""
    cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'{_closest(section, SECTIONS)}: "
                            f"sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping of settings, got {values!r}")
        names = [f.name for f in fields_of(section)]
        for name, value in values.items():
            if name not in names:
                raise UserError(f"unknown setting '{section}.{name}'{_closest(name, names)}")
            setattr(getattr(cfg, section), name, coerce(section, name, value))
    return cfg


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config file on top of `base` (default: the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{path}' is not UTF-8 text (byte {e.start}): is it a YAML file?") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return apply_overrides(base or Config(), data)


def dump_yaml(cfg: Config) -> str:
    """The config as YAML text, readable by `load_yaml`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def compile_step(cfg: TrainConfig, device_type: str) -> bool:
    """Whether training compiles its step: `compile` auto means on CUDA."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")


def resolve_image_size(cfg: DataConfig) -> int:
    """The image side of synthetic data and streamed folders: `image_size`, or with 0 the dataset's default."""
    return cfg.image_size or DEFAULT_IMAGE_SIZE.get(cfg.dataset, 32)


def rounding_multiple(cfg: SearchConfig, device_type: str) -> int:
    """The multiple pruned layers are rounded up to: `round_channels`, or with 0 (auto) the CUDA default."""
    if cfg.round_channels:
        return cfg.round_channels
    return GPU_ROUND_CHANNELS if device_type == "cuda" else 1


def resolve_milestones(milestones: list, epochs: int) -> list[int]:
    """Milestones in epochs: values below 1 are fractions of `epochs` (0.5 of 160 -> 80)."""
    return sorted(int(round(m * epochs)) if m < 1 else int(m) for m in milestones)

"""Options every sub-command shares, their checks, and loading a model from them."""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numba

from hybridinfer import cuda_side, kernels, sparse_gguf
from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.inputs import InputSparseFFN, InputSparsity
from hybridinfer.loader import FFNActivation, ModelArgs, Weights, load_weights, model_fingerprint
from hybridinfer.ffn import SPARSE_MODES, ActiveSet, CPUSide, HybridFFN, make_ffn
from hybridinfer.model import N_BATCH, RunState, Transformer
from hybridinfer.placement import Placement, neuron_bytes, place
from hybridinfer.predictors import PredictorError, PredictorSet, SparsityStats, activity
from hybridinfer.predictors import load as load_predictor
from hybridinfer.predictors.activity import ActivationStats
from hybridinfer.predictors.mlp import DEFAULT_QTYPE, PREDICTOR_QTYPES
from hybridinfer.predictors.thresholds import Thresholds
from hybridinfer.predictors.thresholds import load as load_thresholds
from hybridinfer.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-relu-llama.q8_0.gguf"
DEFAULT_PREDICTOR = DEFAULT_MODEL.with_suffix("").with_suffix(".predictor")  # used with the default model
DEFAULT_STATS = DEFAULT_MODEL.with_suffix("").with_suffix(".stats.safetensors")  # its activation profile
MAX_BUDGET_GIB = 2.0 ** 20  # --vram-budget's bound: far above any device, far below float trouble
DEVICES = ("cpu", "cuda")
MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # numba's pool size, fixed when it starts: the machine's cores
DEFAULT_THREADS = MAX_THREADS


def int_at_least(low: int, high: int | None = None, why: str = ""):
    """An argument parser for whole numbers in [low, high]; why explains the upper bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"{low} to {high}{why}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bounds})")
        return value
    return parse


def float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({'(' if low_open else '['}{low}, {high}])")
        return value
    return parse


def ffn_act_arg(text: str) -> FFNActivation:
    try:
        return FFNActivation.parse(text)
    except HybridInferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arguments(parser: argparse.ArgumentParser, ctx_default: int | None, ctx_help: str | None,
                        sparse_options: bool = True) -> None:
    """The model, threads and FFN activation options; -c unless ctx_default is None; the FFN mode
    and predictor options unless sparse_options is False (the command then runs dense)."""
    parser.add_argument("model", nargs="?", type=Path, help=f"GGUF file (default: {DEFAULT_MODEL.name}, shipped)")
    parser.add_argument("-m", "--model", dest="model_opt", type=Path, metavar="MODEL", help="GGUF file")
    if ctx_default is not None:
        parser.add_argument("-c", "--ctx-size", type=int_at_least(0), default=ctx_default, help=ctx_help)
    parser.add_argument("-t", "--threads", type=int_at_least(1, MAX_THREADS, ": this machine's cores"),
                        default=DEFAULT_THREADS,
                        help=f"threads (default: {DEFAULT_THREADS})")
    parser.add_argument("--ffn-act", type=ffn_act_arg, metavar="silu|relu|drelu|fatrelu:T",
                        help="FFN activation (default: the file's hybridinfer.ffn_activation, silu where it has none)")
    if not sparse_options:
        parser.set_defaults(sparse="off", predictor=None, predictor_type=DEFAULT_QTYPE, thresholds=None)
        return
    parser.add_argument("--sparse", choices=SPARSE_MODES,
                        help="FFN mode (default: predicted with --predictor, else exact for ReLU/FATReLU/dReLU "
                             "models or CETT --thresholds, input for TEAL --thresholds, else off)")
    parser.add_argument("--thresholds", type=Path, metavar="DIR",
                        help="calibrated thresholds (hybridinfer calibrate): CETT ones define the active set of "
                             "--sparse exact and predicted on SiLU models, TEAL ones drive --sparse input")
    parser.add_argument("--predictor", type=Path, metavar="DIR",
                        help="predictor directory (ours or PowerInfer's); the default model uses its own")
    parser.add_argument("--predictor-type", choices=list(PREDICTOR_QTYPES), default=DEFAULT_QTYPE,
                        help=f"predictor weights at run time: as stored (f16) or quantised at load to q8_0 "
                             f"(half the bytes) or q4_0 (about a quarter) (default: {DEFAULT_QTYPE})")
    parser.add_argument("--vram-budget", type=float_in(0.0, MAX_BUDGET_GIB), metavar="GiB",
                        help="split hot and cold neurons: at most this many GiB on the fast device for the hottest "
                             "FFN neurons (needs --sparse predicted and a --profile)")
    parser.add_argument("--profile", type=Path, metavar="STATS",
                        help="activation statistics for --vram-budget (hybridinfer profile, or PowerInfer's "
                             "activation folder); the default model uses its own")
    parser.add_argument("--device", choices=DEVICES,
                        help="the fast device of --vram-budget: cuda, or cpu (the same split, computed on the CPU) "
                             "(default: cuda when a GPU is visible, else cpu)")


@dataclass
class Session:
    gguf: GGUFFile
    tokenizer: Tokenizer
    model: Transformer
    load_s: float
    mode: str  # the FFN mode: off, exact, predicted or input
    stats: SparsityStats | InputSparsity | None  # with stats=True (input mode: the inputs' counts)
    split: "Split | None" = None  # with --vram-budget

    @property
    def placement(self) -> Placement | None:
        return self.model.ffn.placement if self.split else None

    def describe_placement(self) -> str | None:
        return self.placement.describe(self.split.device) if self.split else None


@dataclass
class Split:
    """--vram-budget's hot/cold split: the fast device, its budget in bytes, the profile to place by."""
    device: str
    budget: int
    counts: ActivationStats

    def model(self, margs: ModelArgs, weights: Weights, n_ctx: int, predictor: PredictorSet,
              sparsity: SparsityStats | None = None, cett: Thresholds | None = None,
              whole_layers: bool = False) -> Transformer:
        """A model whose FFN is split by a placement under the budget (with whole_layers: whole
        layers from the first, the baseline) and whose first layers' attention runs on the fast side
        where the placement puts it there."""
        side = _fast_side(self.device, margs, self.budget)
        placement = place(self.counts, [neuron_bytes(blk) for blk in weights.blk], self.budget,
                          side.scratch_bytes(margs), side.layer_bytes(weights.blk, margs, n_ctx),
                          whole_layers=whole_layers)
        model = Transformer(margs, weights, n_ctx,
                            HybridFFN(margs, N_BATCH, weights.blk, predictor, placement, side, sparsity,
                                      ActiveSet(margs.ffn_act, cett)))
        side.attach(model, placement.layers)
        return model


def _sparse_mode(args: argparse.Namespace, act: FFNActivation, predictor: bool, thresholds: Thresholds | None) -> str:
    method = thresholds.method if thresholds else None
    mode = args.sparse or ("input" if method == "teal" else "predicted" if predictor
                           else "exact" if act.sparse or method == "cett" else "off")
    if mode == "predicted" and not predictor:
        train = "tools/train_predictor.py --thresholds DIR" if method == "cett" else "tools/train_predictor.py"
        raise HybridInferError(f"--sparse predicted needs a predictor: give --predictor DIR (train one with {train})")
    if mode != "predicted" and args.predictor:
        raise HybridInferError(f"--predictor is used by --sparse predicted only, not --sparse {mode}")
    if mode == "input" and method != "teal":
        raise HybridInferError("--sparse input needs TEAL thresholds: give --thresholds DIR made by hybridinfer "
                               "calibrate --method teal")
    if method == "teal" and mode != "input":
        raise HybridInferError(f"TEAL thresholds (--thresholds) are for --sparse input, not --sparse {mode}")
    if method == "cett" and mode == "off":
        raise HybridInferError("CETT thresholds (--thresholds) are for --sparse exact or predicted, not --sparse off")
    if mode in ("exact", "predicted") and not act.sparse and method != "cett":
        raise HybridInferError(f"--sparse {mode} needs an FFN activation with exact zeros, but the model uses "
                               f"{act}: pass --ffn-act relu, drelu or fatrelu:T if it was trained so, or CETT "
                               f"--thresholds DIR (hybridinfer calibrate --method cett)")
    return mode


def _split(args: argparse.Namespace, mode: str, path: Path, embedded: bool) -> tuple[str | None, Path | None]:
    """The fast device and the profile of --vram-budget (None, None without it; None for the profile
    a converted file carries, embedded), checked."""
    budget, device, profile = getattr(args, "vram_budget", None), getattr(args, "device", None), \
        getattr(args, "profile", None)
    if budget is None:
        for flag, value in (("--device", device), ("--profile", profile)):
            if value is not None:
                raise HybridInferError(f"{flag} is used with --vram-budget GiB only")
        return None, None
    if mode != "predicted":
        raise HybridInferError(f"--vram-budget splits predicted mode's neurons, not --sparse {mode}'s: give a "
                               f"--predictor (or --sparse predicted)")
    profile = profile or (DEFAULT_STATS if path == DEFAULT_MODEL else None)
    if profile is None and not embedded:
        raise HybridInferError("--vram-budget needs the model's activation statistics: give --profile STATS "
                               "(make them with hybridinfer profile)")
    if device is None:
        device = "cuda" if cuda_side.gpu_visible() else "cpu"
    return device, profile


def _fast_side(device: str, margs: ModelArgs, budget: int):
    """The fast side for --device, refused when the device cannot hold budget bytes."""
    if device == "cpu":
        return CPUSide(margs)
    side = cuda_side.CUDASide(margs)
    free = cuda_side.free_memory()
    if budget > free:
        raise HybridInferError(f"--vram-budget {budget / 2**30:.2f} GiB is more than the GPU's free memory "
                               f"({free / 2**30:.2f} GiB): give at most that")
    return side


def check_plot(path: Path | None) -> None:
    """With --plot, refuse before the work, not after it, where matplotlib is missing."""
    try:
        if path is not None:
            activity.pyplot()
    except activity.StatsError as e:
        raise HybridInferError(str(e)) from None


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (Linux MemAvailable, else physical)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(margs: ModelArgs, n_ctx: int, ctx_flag: str) -> None:
    """Refuse a context whose KV cache and scratch buffers would not fit, before allocating them."""
    need, have = RunState.nbytes(margs, n_ctx, N_BATCH), available_memory()
    if need > have:
        raise HybridInferError(f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB for the KV cache and "
                               f"scratch buffers, more than the {have / 2**30:.1f} GiB of memory available: "
                               f"lower {ctx_flag}")


def load_session(args: argparse.Namespace, n_ctx: int | None = None, stats: bool = False) -> Session:
    """Open the model the arguments name with n_ctx (or -c; 0 means the model's, capped at 4096).

    -c may not exceed the model's training context; an explicit n_ctx (bench) may, with a notice.
    """
    if args.model and args.model_opt and args.model != args.model_opt:
        raise HybridInferError(f"two models given: '{args.model}' and -m '{args.model_opt}'")
    path = args.model_opt or args.model or DEFAULT_MODEL
    start = time.perf_counter()
    kernels.set_threads(args.threads)
    gguf = GGUFFile(path)
    margs = ModelArgs.from_metadata(gguf.metadata, args.ffn_act)
    tokenizer = Tokenizer.from_metadata(gguf.metadata, n_vocab=margs.n_vocab)
    ctx_size = getattr(args, "ctx_size", 0)
    if ctx_size > margs.n_ctx_train:
        raise HybridInferError(f"-c {ctx_size} is out of range: the model was trained for at most "
                               f"{margs.n_ctx_train} tokens")
    ctx_flag = "-p/-n" if n_ctx else "-c"
    n_ctx = n_ctx or ctx_size or min(4096, margs.n_ctx_train)
    _check_memory(margs, n_ctx, ctx_flag)
    if n_ctx > margs.n_ctx_train:
        print(f"notice: a context of {n_ctx} tokens exceeds the model's training context of "
              f"{margs.n_ctx_train}", file=sys.stderr)
    default_predictor = DEFAULT_PREDICTOR if path == DEFAULT_MODEL and args.sparse in (None, "predicted") else None
    predictor_dir = args.predictor or default_predictor  # else a sparse GGUF's own, if it has one
    fp = model_fingerprint(gguf, margs)
    try:
        thresholds = load_thresholds(args.thresholds, fp) if getattr(args, "thresholds", None) else None
    except PredictorError as e:
        raise HybridInferError(str(e)) from None
    mode = _sparse_mode(args, margs.ffn_act, bool(predictor_dir) or sparse_gguf.has_predictor(gguf), thresholds)
    embedded_profile = sparse_gguf.profile(gguf, margs)  # a converted file's, if it carries one
    device, profile = _split(args, mode, path, embedded_profile is not None)
    with kernels.compile_notice():  # a first run compiles its kernels here, before any text streams
        weights = load_weights(gguf, margs)
        predictor = None
        try:
            if mode == "predicted" and predictor_dir:
                trained = sparse_gguf.permuted_predictor(load_predictor(predictor_dir, fp), gguf, margs)
                predictor = PredictorSet(trained, args.predictor_type)
            elif mode == "predicted":
                predictor = sparse_gguf.predictor(gguf, margs)
            if device:
                counts = sparse_gguf.permuted(activity.load(profile, fp), gguf, margs) if profile else embedded_profile
        except PredictorError as e:
            raise HybridInferError(str(e)) from None
        sparsity = SparsityStats(margs.n_layer, margs.n_ff) if stats and mode != "off" else None
        cett = thresholds if thresholds and thresholds.method == "cett" else None
        split = None
        if mode == "input":
            inputs = InputSparsity(weights.blk, thresholds, N_BATCH)
            model = Transformer(margs, weights, n_ctx, InputSparseFFN(margs, N_BATCH, inputs, counting=stats),
                                inputs=inputs)
            sparsity = inputs if stats else None
        elif device:
            split = Split(device, int(args.vram_budget * 2**30), counts)
            model = split.model(margs, weights, n_ctx, predictor, sparsity, cett)
        else:
            model = Transformer(margs, weights, n_ctx,
                                make_ffn(mode, margs, weights.blk, N_BATCH, predictor, sparsity, cett))
        model.warm_up()
    return Session(gguf, tokenizer, model, time.perf_counter() - start, mode, sparsity, split)

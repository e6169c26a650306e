"""Train each layer's predictor on a Collection, calibrate its threshold, validate it on held-out text.

Whole chunks are held out, never single tokens of a chunk the MLP trained on: a calibration share
sets each layer's threshold for the target recall and picks the epoch, and a separate validation
share gives the reported table. Per layer and epoch the threshold is the one that reaches the
target recall on the calibration chunks, and the epoch kept is the one with the highest predicted
sparsity there: recall and sparsity together, not recall alone.

Loss: binary cross-entropy with pos_weight = negatives / positives (as Deja Vu and PowerInfer);
AdamW with cosine decay. The input is scaled per feature by its RMS for training, a scale folded
into fc1 afterwards, so the saved predictor reads the raw residual stream. Deterministic given the
seed and thread count.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hybridinfer.predictors.collect import Collection, progress_bar
from hybridinfer.predictors.format import Fingerprint, PredictorWeights
from hybridinfer.predictors.mlp import PredictorSet
from hybridinfer.predictors.stats import SparsityStats

CALIBRATION_SHARE = 0.10  # of the chunks: thresholds and epoch choice
VALIDATION_SHARE = 0.05  # of the chunks: the reported table


@dataclass
class TrainOptions:
    rank: int = 128
    epochs: int = 8
    seed: int = 0
    target_recall: float = 0.95
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-2
    progress: bool = True


@dataclass
class Split:
    train: np.ndarray  # chunk ids
    calibration: np.ndarray
    validation: np.ndarray


def split_chunks(n_chunks: int, seed: int) -> Split:
    """A seeded split of chunk ids; at least one chunk each for training, calibration and validation."""
    if n_chunks < 3:
        raise ValueError(f"{n_chunks} chunk(s) of text collected, at least 3 are needed (training, calibration, "
                         f"validation): raise --tokens or give more text")
    order = np.random.default_rng(seed).permutation(n_chunks)
    n_cal = max(1, round(n_chunks * CALIBRATION_SHARE))
    n_val = max(1, round(n_chunks * VALIDATION_SHARE))
    if n_chunks - n_cal - n_val < 1:
        n_cal, n_val = 1, 1
    return Split(np.sort(order[n_cal + n_val:]), np.sort(order[:n_cal]), np.sort(order[n_cal:n_cal + n_val]))


def _unpack(packed: torch.Tensor, n_ff: int) -> torch.Tensor:
    """uint8 [N, ceil(n_ff/8)] (np.packbits order, most significant bit first) -> float32 [N, n_ff]."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n_ff].float()


class _MLP(torch.nn.Module):
    def __init__(self, n_embd: int, rank: int, n_ff: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(n_embd, rank, bias=False)
        self.fc2 = torch.nn.Linear(rank, n_ff, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def calibrate(logits: torch.Tensor, truth: torch.Tensor, target_recall: float) -> tuple[float, float]:
    """(threshold, predicted sparsity): the highest threshold whose pooled recall reaches target_recall."""
    pos = logits[truth.bool()]
    if pos.numel() == 0:  # nothing ever fires: predict nothing
        return float(logits.max()) + 1.0, 1.0
    # at most floor((1 - target) * n_pos) positives may fall below the threshold
    k = int(math.floor((1.0 - target_recall) * pos.numel() + 1e-9))
    threshold = float(torch.kthvalue(pos, k + 1).values) if k + 1 <= pos.numel() else float(pos.min())
    sparsity = 1.0 - float((logits >= threshold).float().mean())
    return threshold, sparsity


def _f16_logits(model: _MLP, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits of raw inputs x with the weights as they will be saved (F16, scale folded into fc1)."""
    w1 = (model.fc1.weight / scale).half().float()
    w2 = model.fc2.weight.half().float()
    return torch.relu(x @ w1.T) @ w2.T


def train_layer(x_train, y_train, x_cal, y_cal, n_ff: int, opts: TrainOptions, layer: int) -> tuple[dict, list[dict]]:
    """Train one layer; x f16 [N, n_embd] tensors, y packed uint8 masks. Returns the kept weights
    (fc1, fc2 float32 with the scale folded in, threshold, epoch) and a per-epoch history."""
    torch.manual_seed(opts.seed * 1000 + layer)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + layer)
    n, n_embd = x_train.shape
    scale = x_train.float().pow(2).mean(0).sqrt().clamp_min(1e-6)  # [n_embd] RMS per feature
    n_pos = sum(int(_unpack(y_train[i:i + 4096], n_ff).sum()) for i in range(0, n, 4096))
    n_neg = n * n_ff - n_pos
    pos_weight = torch.tensor(n_neg / max(n_pos, 1), dtype=torch.float32)
    model = _MLP(n_embd, opts.rank, n_ff)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = -(-n // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    x_cal_f = x_cal.float()
    y_cal_f = _unpack(y_cal, n_ff)
    best, history = None, []
    for epoch in range(1, opts.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * opts.batch_size:(s + 1) * opts.batch_size]
            x = x_train[idx].float() / scale
            y = _unpack(y_train[idx], n_ff)
            loss = loss_fn(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            logits = _f16_logits(model, x_cal_f, scale)
            threshold, sparsity = calibrate(logits, y_cal_f, opts.target_recall)
        history.append({"epoch": epoch, "loss": total_loss / n, "threshold": threshold,
                        "calibration_predicted_sparsity": sparsity})
        if best is None or sparsity > best["sparsity"]:
            best = {"epoch": epoch, "threshold": threshold, "sparsity": sparsity,
                    "fc1": (model.fc1.weight / scale).detach().clone(), "fc2": model.fc2.weight.detach().clone()}
    return best, history


def train(col: Collection, fp: Fingerprint, opts: TrainOptions, threads: int | None = None) -> tuple[PredictorWeights, SparsityStats, dict]:
    """Train, calibrate and validate every layer. Returns the weights (with info for config.json),
    the validation statistics, and a training summary."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    split = split_chunks(len(col.chunks), opts.seed)
    rows = {name: col.rows(getattr(split, name)) for name in ("train", "calibration", "validation")}
    fc1, fc2, thresholds, layers = [], [], [], []
    stats = SparsityStats(col.n_layer, col.n_ff)
    bar = progress_bar(range(col.n_layer), desc="train", unit="layer", disable=not opts.progress)
    for layer in bar:
        resid, mask = col.resid(layer), col.mask(layer)
        data = {name: (torch.from_numpy(np.ascontiguousarray(resid[r])), torch.from_numpy(np.ascontiguousarray(mask[r])))
                for name, r in rows.items()}
        best, history = train_layer(*data["train"], *data["calibration"], col.n_ff, opts, layer)
        fc1.append(best["fc1"].numpy().astype(np.float16))
        fc2.append(best["fc2"].numpy().astype(np.float16))
        thresholds.append(best["threshold"])
        layers.append({"layer": layer, "epoch": best["epoch"], "threshold": best["threshold"],
                       "calibration_predicted_sparsity": best["sparsity"], "history": history})
        # validation through the runtime predictor, exactly as inference will run it
        runtime = PredictorSet.from_arrays([fc1[-1]], [fc2[-1]], [thresholds[-1]])
        x_val = resid[rows["validation"]].astype(np.float32)
        truth = col.unpack_mask(mask[rows["validation"]])
        pred = np.zeros_like(truth)
        for i in range(0, len(x_val), 512):
            runtime.predict_mask(0, x_val[i:i + 512], pred[i:i + 512])
        stats.add(layer, truth, pred)
        bar.set_postfix_str(f"epoch {best['epoch']}, val recall {stats.layers()[layer]['recall']:.3f}")
    info = {
        "training": {
            "data": col.sources, "tokens": col.n_tokens,
            "train_tokens": len(rows["train"]), "calibration_tokens": len(rows["calibration"]),
            "validation_tokens": len(rows["validation"]), "chunk_tokens": max(c.length for c in col.chunks),
            "rank": opts.rank, "epochs": opts.epochs, "seed": opts.seed, "target_recall": opts.target_recall,
            "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay,
            "loss": "BCE with pos_weight = negatives / positives", "optimizer": "AdamW, cosine decay",
            "seconds": round(time.perf_counter() - start, 1),
            "layers": layers,
        },
        "validation": {"what": "held-out chunks of the training texts, not used for training or thresholds",
                       **stats.as_dict()},
    }
    return PredictorWeights(fc1, fc2, thresholds, fp, info), stats, info

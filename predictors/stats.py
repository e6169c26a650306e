"""Recall, precision, true and predicted sparsity, as DESIGN.md defines them.

Per layer and token, A is the truly active set and P the predicted set, over n_ff neurons. The
figures are micro-averages: counts are pooled over tokens (per layer) and over tokens and layers
(overall), so recall = sum |A & P| / sum |A| (1.0 when nothing was active) and precision =
sum |A & P| / sum |P| (1.0 when nothing was predicted). The per-layer minimum is reported beside.
"""

import numpy as np

COLUMNS = ("true_sparsity", "predicted_sparsity", "recall", "precision")
HEADERS = ("true sparsity", "predicted sparsity", "recall", "precision")


class SparsityStats:
    def __init__(self, n_layer: int, n_ff: int):
        self.n_ff = n_ff
        self.tokens = np.zeros(n_layer, np.int64)
        self.active = np.zeros(n_layer, np.int64)  # sum |A|
        self.predicted = np.zeros(n_layer, np.int64)  # sum |P|
        self.hits = np.zeros(n_layer, np.int64)  # sum |A & P|

    def add(self, layer: int, true_mask: np.ndarray, pred_mask: np.ndarray) -> None:
        """Count tokens of boolean masks true_mask, pred_mask [T, n_ff]."""
        self.add_counts(layer, len(true_mask), int(np.count_nonzero(true_mask)),
                        int(np.count_nonzero(pred_mask)), int(np.count_nonzero(true_mask & pred_mask)))

    def add_counts(self, layer: int, n_tokens: int, n_active: int, n_predicted: int, n_hits: int) -> None:
        self.tokens[layer] += n_tokens
        self.active[layer] += n_active
        self.predicted[layer] += n_predicted
        self.hits[layer] += n_hits

    @staticmethod
    def _row(tokens, active, predicted, hits, n_ff) -> dict:
        slots = max(int(tokens) * n_ff, 1)
        return {"tokens": int(tokens),
                "true_sparsity": 1.0 - active / slots,
                "predicted_sparsity": 1.0 - predicted / slots,
                "recall": hits / active if active else 1.0,
                "precision": hits / predicted if predicted else 1.0}

    def layers(self) -> list[dict]:
        """One row per layer: tokens and the four figures."""
        return [{"layer": i, **self._row(*c, self.n_ff)}
                for i, c in enumerate(zip(self.tokens, self.active, self.predicted, self.hits))]

    def overall(self) -> dict:
        return self._row(self.tokens.sum(), self.active.sum(), self.predicted.sum(), self.hits.sum(), self.n_ff)

    def minimum(self) -> dict:
        """Per column, the lowest per-layer value."""
        rows = self.layers()
        return {c: min(r[c] for r in rows) for c in COLUMNS}

    def as_dict(self) -> dict:
        return {"layers": self.layers(), "overall": self.overall(), "min": self.minimum()}

    def markdown(self) -> str:
        lines = ["| layer | tokens | " + " | ".join(HEADERS) + " |", "|---:|---:|" + "---:|" * len(COLUMNS)]
        for r in self.layers():
            lines.append(f"| {r['layer']} | {r['tokens']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + " |")
        o, m = self.overall(), self.minimum()
        lines.append(f"| all (micro) | {o['tokens']} | " + " | ".join(f"{o[c]:.4f}" for c in COLUMNS) + " |")
        lines.append("| min over layers | | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + " |")
        return "\n".join(lines)

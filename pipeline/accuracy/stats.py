"""Paired bootstrap intervals for accuracy gates: pure numpy, no I/O.

A gate compares two models scored on the *same* documents, so the uncertainty that matters is
that of the difference, not of each score: most documents are answered the same way by both
models and carry no information about the gap. The paired bootstrap resamples documents (with
replacement) and evaluates both models' aggregate on the same resample, so the between-document
variance cancels and only the documents where the models differ move the statistic.

Choices, and why:
- Percentile interval (Efron & Tibshirani, "An Introduction to the Bootstrap", ch. 13): the 2.5%
  and 97.5% quantiles of the resampled statistic. It is transformation-respecting (the interval of
  1/r is 1/interval of r), which matters because lower-is-better metrics are stated as a relative
  increase and higher-is-better ones as a ratio. BCa would correct bias/skew at O(1/n), which at
  the suite's n (thousands of documents) is below the third decimal; percentile needs no jackknife.
- 2,000 resamples with a fixed seed (SEED): the same inputs always give the same interval
  (reproducible runs, DVC caching); with B = 2000 each 2.5% tail holds 50 resamples, and the
  interval's ends move by well under 0.005 between seeds on the smoke suite (tests/unit/test_gate_stats.py).
- The statistic is computed with lm-eval's own aggregation of the per-document values
  (lm_eval/api/metrics.py, 0.4.13): `mean` (acc, acc_norm, exact_match), `weighted_perplexity`
  (word/byte perplexity: exp(-sum loglik / sum weight)) and `bits_per_byte`
  (-sum loglik / sum bytes / ln 2), so the point estimate equals lm-eval's reported value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where it is used: pipeline.accuracy.gates (and so `forge publish` / `pull` on the slim
# install, which has no numpy) needs only Interval.

Aggregation = Literal["mean", "weighted_perplexity", "bits_per_byte"]
AGGREGATIONS: tuple[Aggregation, ...] = ("mean", "weighted_perplexity", "bits_per_byte")
METHOD = "paired percentile bootstrap"
CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 20261201


@dataclass(frozen=True)
class Interval:
    """A point estimate of quantized/baseline (the aggregate ratio) and its bootstrap interval."""

    point: float
    lower: float
    upper: float
    n: int
    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES
    seed: int = SEED
    method: str = METHOD

    @property
    def half_width(self) -> float:
        return (self.upper - self.lower) / 2


def aggregate(values: np.ndarray, aggregation: Aggregation) -> np.ndarray:
    """lm-eval's aggregation over the last document axis. `values` is (..., n) for `mean` and
    (..., n, 2) = (loglikelihood, weight) pairs for the perplexity aggregations."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if aggregation == "mean":
        return values.mean(axis=-1)
    loglik, weight = values[..., 0].sum(axis=-1), values[..., 1].sum(axis=-1)
    if aggregation == "weighted_perplexity":
        return np.exp(-loglik / weight)
    if aggregation == "bits_per_byte":
        return -loglik / weight / math.log(2)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_ratio_interval(
    baseline: np.ndarray,
    quantized: np.ndarray,
    aggregation: Aggregation,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Interval of aggregate(quantized) / aggregate(baseline) over documents paired by position.

    Both arrays hold one row per document in the same order (the caller pairs them by doc id).
    A resample whose baseline aggregate is 0 gives inf (or 1 when both are 0), as pipeline.accuracy.gates
    decides a zero denominator.
    """
    import numpy as np

    b, q = np.asarray(baseline, dtype=np.float64), np.asarray(quantized, dtype=np.float64)
    if b.shape != q.shape:
        raise ValueError(f"baseline and quantized must be paired document by document: shapes {b.shape} vs {q.shape}")
    n = b.shape[0]
    if n == 0:
        raise ValueError("no documents to bootstrap")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    point = float(_ratio(aggregate(q, aggregation), aggregate(b, aggregation)))
    idx = _resample_indices(n, resamples, seed)
    stats = _ratio(aggregate(q[idx], aggregation), aggregate(b[idx], aggregation))
    alpha = (1 - confidence) / 2
    lower, upper = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(point, float(lower), float(upper), n, confidence, resamples, seed)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(numerator, dtype=np.float64) / denominator
    zero = np.asarray(denominator) == 0
    return np.where(zero, np.where(np.asarray(numerator) == 0, 1.0, np.inf), out)


def disagreement_rate(baseline_choice: np.ndarray, quantized_choice: np.ndarray) -> float:
    """Fraction of documents where the two models pick a different answer (multiple choice)."""
    import numpy as np

    b, q = np.asarray(baseline_choice), np.asarray(quantized_choice)
    if b.shape != q.shape or b.size == 0:
        raise ValueError(f"choices must be paired and non-empty: shapes {b.shape} vs {q.shape}")
    return float(np.mean(b != q))


def required_documents(disagreement: float, baseline_accuracy: float, half_width: float,
                       confidence: float = CONFIDENCE) -> int:
    """Normal-approximation size for a recovery interval of +-half_width: the paired difference of
    two 0/1 scores has variance <= d (the rate at which they disagree), so the ratio's standard
    error is about sqrt(d / n) / baseline accuracy. For planning only; the gate uses the bootstrap."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return math.ceil(disagreement * (z / (half_width * baseline_accuracy)) ** 2)

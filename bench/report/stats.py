"""Statistics over seeds: mean, std and the 95% t-interval of a group, and the paired
t-test of two groups on the seeds both ran (scipy, imported when first needed)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

ALPHA = 0.05


def t_quantile(dof: int, level: float = 0.95) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def summarize(values) -> dict:
    """n, mean, std (ddof=1) and the 95% t-interval of the mean; n=1 has no spread."""
    v = np.asarray([x for x in values if x is not None and not pd.isna(x)], dtype=float)
    n = len(v)
    out = {"n": n, "mean": float(v.mean()) if n else math.nan, "std": math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if n >= 2:
        std = float(v.std(ddof=1))
        half = t_quantile(n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def paired_test(a: pd.Series, b: pd.Series) -> dict:
    """Paired t-test of a - b over the seeds both hold (index = seed). The verdict says
    whether a's lead holds at the 5% level, or why no test is possible: fewer than two
    pairs, or the same difference on every seed (no variance: t is undefined)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    # float32 noise (0.1 logged by two frameworks) must not pass for a real difference;
    # accuracies are counts over fewer than a million test images
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    d = np.where(np.abs(d) < 1e-7, 0.0, d)
    n = len(d)
    out = {"pairs": n, "mean_diff": float(d.mean()) if n else math.nan, "p_value": math.nan,
           # the standard error of the mean difference (what error bars over seeds show)
           "se": float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan}
    if n < 2:
        out["verdict"] = f"n too small ({n} pair{'s' if n != 1 else ''})"
        return out
    if np.allclose(d, d[0], rtol=0, atol=1e-7):
        out["verdict"] = (f"no (no difference on {n} seeds)" if d[0] == 0 else
                          f"same difference on all {n} seeds (no variance, no test)")
        if d[0] == 0:
            out["p_value"] = 1.0
        return out
    from scipy import stats

    # the denoised differences against zero: scipy's paired test of a and b
    p = float(stats.ttest_rel(d, np.zeros(n)).pvalue)
    out["p_value"] = p
    holds = p < ALPHA and d.mean() > 0
    out["verdict"] = f"{'yes' if holds else 'no'} (p={p:.3g}, {n} pairs)"
    return out

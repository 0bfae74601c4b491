"""zkd-analyze's statistics (pure NumPy) and figures (matplotlib Agg, PNG).

Logits are ``[N, C]`` arrays of one model on the N test images; ``t`` the teacher's, ``s`` a
student's. With ``Z(x) = (x - mean(x)) / (std(x) + 1e-7)`` per row (std unbiased, ``ddof=1``: the
paper's logit standardization, ``zkd_jax.losses.standardize``):

* ``logit_moments(x)``: per-sample mean and std (``ddof=1``) of the logits, ``[N]`` each, and
  their averages; on ``Z(x)`` they are 0 and 1 up to rounding.
* ``class_correlation(x)``: the ``[C, C]`` Pearson correlation between class columns over the N
  samples; ``correlation_difference(t, s) = |corr(t) - corr(s)|`` and its mean over the
  ``C (C - 1)`` off-diagonal entries.
* ``agreement(t, s) = 100 * mean(argmax t == argmax s)`` (top-1 agreement, %).
* ``kl(t, s) = mean_n sum_c p_t (log p_t - log p_s)`` with ``p = softmax(x / T)``, T = 1, on raw
  and on standardized logits.
* ``histogram2d(t, s)``: the bivariate histogram of (teacher logit, student logit) over every
  sample and class.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

EPS = 1e-7


def standardize(x: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Row-wise Z-score ``(x - mean) / (std_ddof1 + eps)`` of ``[N, C]`` logits (float64)."""
    x = np.asarray(x, np.float64)
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / (x.std(axis=-1, ddof=1, keepdims=True) + eps)


def logit_moments(x: np.ndarray) -> dict[str, Any]:
    """Per-sample mean and std (``ddof=1``) ``[N]`` and their mean/std over the samples."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=-1), x.std(axis=-1, ddof=1)
    return {"mean": mean, "std": std, "mean_of_mean": float(mean.mean()),
            "std_of_mean": float(mean.std()), "mean_of_std": float(std.mean()),
            "std_of_std": float(std.std())}


def class_correlation(x: np.ndarray) -> np.ndarray:
    """``[C, C]`` Pearson correlation of the class columns of ``[N, C]`` logits."""
    return np.corrcoef(np.asarray(x, np.float64), rowvar=False)


def correlation_difference(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, float]:
    """``|corr(t) - corr(s)|`` ``[C, C]`` and its mean over the off-diagonal entries."""
    diff = np.abs(class_correlation(t) - class_correlation(s))
    c = diff.shape[0]
    off = ~np.eye(c, dtype=bool)
    return diff, float(diff[off].mean()) if c > 1 else 0.0


def log_softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl(t: np.ndarray, s: np.ndarray, temperature: float = 1.0) -> float:
    """``mean_n KL(softmax(t / T) || softmax(s / T))``."""
    lt, ls = log_softmax(t, temperature), log_softmax(s, temperature)
    return float((np.exp(lt) * (lt - ls)).sum(axis=-1).mean())


def agreement(t: np.ndarray, s: np.ndarray) -> float:
    """Top-1 agreement of two models, in %."""
    return float(100.0 * np.mean(np.argmax(t, axis=-1) == np.argmax(s, axis=-1)))


def accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(np.argmax(x, axis=-1) == np.asarray(labels)))


def histogram2d(t: np.ndarray, s: np.ndarray, bins: int = 60) -> dict[str, np.ndarray]:
    """Counts ``[bins, bins]`` of (teacher, student) logit pairs with their bin edges."""
    counts, xe, ye = np.histogram2d(np.ravel(t), np.ravel(s), bins=bins)
    return {"counts": counts, "teacher_edges": xe, "student_edges": ye}


def compare(t: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """The scalar statistics of one student against the teacher (raw and standardized)."""
    zt, zs = standardize(t), standardize(s)
    _, corr_mean = correlation_difference(t, s)
    return {"agreement": agreement(t, s), "kl_raw": kl(t, s), "kl_standardized": kl(zt, zs),
            "correlation_difference_mean": corr_mean}


def moments_summary(x: np.ndarray) -> dict[str, dict[str, float]]:
    """``logit_moments`` averages of raw and standardized logits (no per-sample arrays)."""
    out = {}
    for name, values in (("raw", x), ("standardized", standardize(x))):
        m = logit_moments(values)
        out[name] = {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def _caption(fig, caption: str) -> None:
    """``caption`` (what was run) under the figure's panels."""
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)


def _finish(fig, path: str, caption: str) -> str:
    plt = _pyplot()
    bottom = min(0.25, 0.5 / fig.get_figheight()) if caption else 0.0  # ~3 lines of 7 pt text
    fig.tight_layout(rect=(0, bottom, 1, 1))
    _caption(fig, caption)
    tmp = f"{path}.tmp.png"  # written whole, then renamed
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_moments(logits: dict[str, np.ndarray], path: str, caption: str = "") -> str:
    """Per-sample mean vs std of every model's raw logits in one panel (teacher and students).

    Standardized logits are not drawn: every row of ``Z(x)`` has mean 0 and std 1 by construction.
    Where the students' points lie against the teacher's shows whether a student copies the
    teacher's logit scale (KD) or only its relations (an LS student's scale is free).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (name, x) in enumerate(logits.items()):
        m = logit_moments(x)
        ax.scatter(m["mean"], m["std"], s=4, alpha=0.5, color=f"C{i}",
                   label=f"{name} (mean std {m['mean_of_std']:.2f})")
    ax.set_xlabel("per-sample logit mean")
    ax.set_ylabel("per-sample logit std")
    ax.set_title("raw logits: per-sample mean and std", fontsize=9)
    ax.legend(fontsize=7, markerscale=3)
    ax.grid(alpha=0.3)
    return _finish(fig, path, caption)


def plot_histogram2d(t: np.ndarray, s: np.ndarray, name: str, path: str, bins: int = 60,
                     caption: str = "") -> str:
    """Teacher vs student logits as 2-D histograms (raw, standardized), log-scaled counts."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, title, (a, b) in ((axes[0], "raw", (t, s)),
                              (axes[1], "Z-scored", (standardize(t), standardize(s)))):
        h = histogram2d(a, b, bins)
        image = ax.pcolormesh(h["teacher_edges"], h["student_edges"], h["counts"].T,
                              norm=LogNorm(vmin=1), cmap="magma_r")
        lo, hi = min(h["teacher_edges"][0], h["student_edges"][0]), max(
            h["teacher_edges"][-1], h["student_edges"][-1])
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="student = teacher")
        ax.set_xlabel("teacher logit")
        ax.set_ylabel(f"student logit ({name})")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        fig.colorbar(image, ax=ax, label="count")
    return _finish(fig, path, caption)


def plot_correlation_difference(t: np.ndarray, s: np.ndarray, name: str, path: str,
                                vmax: float | None = None, caption: str = "") -> str:
    """Heat map of ``|corr(teacher) - corr(student)|`` with its off-diagonal mean in the title.

    ``vmax``: the top of the colour scale; pass the largest difference over the students compared
    (``write_analysis`` does) so that every student's map uses the same scale.
    """
    plt = _pyplot()
    diff, mean = correlation_difference(t, s)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(diff, cmap="PuBuGn", vmin=0.0, vmax=vmax)
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    ax.set_title(f"|corr(teacher) - corr({name})|, mean {mean:.3f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="|difference|")
    return _finish(fig, path, caption)


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding ``[N, 2]`` of ``[N, D]`` features (scikit-learn, PCA init)."""
    try:
        from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError("the t-SNE needs scikit-learn: pip install -e '.[data]'.") from err
    n = features.shape[0]
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity
                ).fit_transform(np.asarray(features, np.float64))


def plot_tsne(embeddings: dict[str, np.ndarray], labels: np.ndarray, path: str,
              caption: str = "") -> str:
    """One panel per model: its t-SNE points coloured by class."""
    plt = _pyplot()
    k = len(embeddings)
    fig, axes = plt.subplots(1, k, figsize=(3.4 * k + 0.6, 3.4), squeeze=False)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20")
    for ax, (name, e) in zip(axes[0], embeddings.items()):
        for i, c in enumerate(classes[:20]):
            sel = labels == c
            ax.scatter(e[sel, 0], e[sel, 1], s=3, color=cmap(i % cmap.N), label=str(c))
        ax.set_title(f"t-SNE of pooled features: {name}", fontsize=8)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    axes[0][-1].legend(fontsize=6, markerscale=3, title="class", title_fontsize=6,
                       loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _finish(fig, path, caption)

"""The report's figures, drawn with matplotlib (no pyplot: no global state, no display) and
returned as PNG bytes; PCA and t-SNE from scikit-learn."""
from __future__ import annotations

import io

import numpy as np

from .records import CURVES, series


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from ..errors import UserError

        raise UserError("massl-report needs matplotlib: pip install 'massl[report]' (or pip install matplotlib)") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curves_png(records: list[dict]) -> bytes | None:
    """One panel per metric of CURVES that the run logged (None: nothing logged)."""
    panels = [(title, [(k, *series(records, k)) for k in keys]) for title, keys in CURVES]
    panels = [(title, lines) for title, lines in panels if any(steps for _, steps, _ in lines)]
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig = _figure(4.2 * cols, 2.8 * rows)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, steps, values in lines:
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """[h, w, ...] -> [size, size, ...] by repeating each patch (shows the patch grid as it is)."""
    h, w = grid.shape[:2]
    rows, cols = np.arange(size) * h // size, np.arange(size) * w // size
    return grid[rows][:, cols]


def attention_png(images: list, maps: np.ndarray, titles: list[str]) -> bytes:
    """A row per image: the image, then each head's CLS attention (maps: [B, heads, h, w]), each
    map scaled from its own minimum to its maximum (where a head looks, not how sharply)."""
    n, heads = maps.shape[:2]
    fig = _figure(1.6 * (heads + 1), 1.7 * n)
    for i, image in enumerate(images):
        pixels = np.asarray(image)
        ax = fig.add_subplot(n, heads + 1, i * (heads + 1) + 1)
        ax.imshow(pixels)
        ax.set_title(titles[i], fontsize=8)
        ax.axis("off")
        for h in range(heads):
            ax = fig.add_subplot(n, heads + 1, i * (heads + 1) + h + 2)
            m = maps[i, h] - maps[i, h].min()
            m = m / max(m.max(), 1e-12)
            ax.imshow(_upsample(m, pixels.shape[0]), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=8)
            ax.axis("off")
    return _png(fig)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """[B, h, w, C] patch tokens -> [B, h, w, 3] in [0, 1]: the first three principal components of
    all the patches together, each scaled to [0, 1] over all the images (DINOv2's figure)."""
    from sklearn.decomposition import PCA

    b, h, w, c = tokens.shape
    flat = tokens.reshape(-1, c).astype(np.float64)
    comps = PCA(n_components=min(3, *flat.shape)).fit_transform(flat)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    return ((comps - lo) / np.where(hi > lo, hi - lo, 1)).reshape(b, h, w, 3)


def pca_png(images: list, rgb: np.ndarray, titles: list[str]) -> bytes:
    """Two rows: the images, then their patch features' PCA as RGB."""
    n = len(images)
    fig = _figure(1.8 * n, 3.8)
    for i, image in enumerate(images):
        pixels = np.asarray(image)
        ax = fig.add_subplot(2, n, i + 1)
        ax.imshow(pixels)
        ax.set_title(titles[i], fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(2, n, n + i + 1)
        ax.imshow(_upsample(rgb[i], pixels.shape[0]), interpolation="nearest")
        ax.axis("off")
    return _png(fig)


def embed_2d(feats: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[N, d] -> [N, 2]: t-SNE (on L2-normalised features, as k-NN compares them) or PCA."""
    x = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if method == "pca" or len(x) < 5:
        from sklearn.decomposition import PCA

        out = PCA(n_components=min(2, *x.shape), random_state=seed).fit_transform(x)
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed).fit_transform(x)


def embedding_png(points: np.ndarray, labels: list, classes: list, method: str) -> bytes:
    """A scatter plot of `points` coloured by class (grey without a label)."""
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    ys = np.asarray(labels)
    for c in sorted(set(ys.tolist())):
        sel = ys == c
        name = classes[c] if 0 <= c < len(classes) else "no label"
        ax.scatter(points[sel, 0], points[sel, 1], s=8, color=_class_colour(c, len(classes)) if c >= 0 else "0.6", label=name)
    ax.set_title(f"{method.upper()} of the teacher's features ({len(points)} images)", fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return _png(fig)


def _class_colour(c: int, n: int):
    from matplotlib import colormaps

    if n <= 20:  # qualitative maps: one distinct colour per class
        return colormaps["tab10" if n <= 10 else "tab20"](c)
    return colormaps["turbo"](c / (n - 1))

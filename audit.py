"""The shortcut audit (explain.py --audit): over every stored map of a selection, the strategies a
model uses for each class it predicts, and the evidence that each of them is a shortcut.

    from audit import audit_maps
    found = audit_maps(model, layer, images_uint8, maps, predicted, seeds)
    found.strategies        # per class, most suspicious first: Strategy(members, flip, control_flip, ...)
    found.member_of         # (N,) the strategy of each map (-1: not audited)

Spectral relevance analysis (SpRAy; Lapuschkin et al., "Unmasking Clever Hans predictors", Nature
Communications 2019) groups the maps of each predicted class by spectral clustering so that a person
can spot the Clever Hans group. SpRAy compares maps pixel by pixel, which finds a watermark that is
always in the same corner; a pen mark can be anywhere on a slide. So each map is described here by
*what* it points at: the model's own features at its Grad-CAM layer, averaged with the map's positive
part as weights ("evidence"); SpRAy's downsampled maps ("spray") are kept for comparison, and
bench/bench.py audit measures both on planted marks.

Each map's **hot spot** is where its (lightly smoothed) positive relevance is at least HOT times its
peak. Per map:
- causal test: the hot spot, grown by a pixel, is filled by ROAD's noisy linear imputation (road.py),
  which carries no information about what was there; does the prediction change? Control: the same
  shape moved to another place of the same image;
- content: the hot spot's relevance-weighted mean colour, chromaticity and texture against the same weights moved
  elsewhere, over the images of its class and over all images: atypical (unlike tissue) where one
  statistic lies more than ATYPICAL robust z-scores (median, MAD) from both.
Per strategy: the share of its maps that change prediction with their hot spot filled and with the
moved control filled, the share atypical, the median hot-spot area and the share of relevance in it.
Its **suspicion** is (flip - control flip, at least 0) x atypical share: a shortcut is something in
a small place, unlike tissue, that decides the prediction. A class's strategies are ranked by
suspicion x sqrt(maps) (evidence()); a strategy of at least MIN_ALARM maps whose suspicion reaches
ALARM raises an alarm (alarmed(), in the report and bench/bench.py audit).
A strategy that raises the alarm then takes in the maps of its class that its kind of spot decided
elsewhere (recruit()): a mark on other tissue can look to the model like that tissue's maps.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data import normalize
from mosaic import layout
from road import NOISE, impute

HOT = 0.3          # a hot spot: the pixels at >= HOT x the peak's smoothed positive relevance
ATYPICAL = 3.0     # robust z-score beyond which a hot spot's colour or texture is not tissue
ALARM = 0.2        # suspicion at which a strategy is flagged as a likely shortcut (chosen on fold 0 of bench/bench.py audit)
MIN_ALARM = 5      # ... if it has at least this many maps (one or two maps decide nothing about a model)
K_MAX = 8          # at most this many strategies per class (chosen by the eigengap)
NEIGHBOURS = 10    # of the k-nearest-neighbour graph the clustering cuts
JOINED = 0.1       # clusters whose graph conductance (beyond the k-NN graph's floor) is above this are one strategy
MIN_CLUSTERED = 2 * NEIGHBOURS  # a class with fewer maps is one strategy
GROW = 1           # px (at 28) the hot spot is grown by before it is filled, to take its edges too
TOL = 1e-4         # the causal test's imputation: relative residual of its conjugate gradients (ROAD's: 1e-7)
MAX_EIGEN = 2000   # maps per class in the eigen-decomposition; the others join their nearest neighbours' strategy
FEATURES = ("evidence", "spray")


@dataclass
class Strategy:
    cls: int
    members: np.ndarray           # indices into the audited maps
    flip: float                   # share whose prediction changes when the hot spot is filled
    control_flip: float           # ... when the same shape elsewhere is filled
    atypical: float               # share whose hot spot is unlike tissue (its class's and all images')
    area: float                   # median hot-spot area, share of the image
    concentration: float          # median share of the positive relevance inside the hot spot
    prob_drop: float              # mean fall of the class's probability with the hot spot filled
    exemplars: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # most typical members

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def suspicion(self) -> float:
        return max(0.0, self.flip - self.control_flip) * self.atypical

    @property
    def alarm(self) -> bool:
        return alarmed(self.suspicion, self.n)

    @property
    def evidence(self) -> float:
        return evidence(self.suspicion, self.n)


def alarmed(suspicion: float, n: int) -> bool:
    """The alarm rule: suspicion at least ALARM, over at least MIN_ALARM maps."""
    return suspicion >= ALARM and n >= MIN_ALARM


def evidence(suspicion: float, n: int) -> float:
    """What strategies are ranked by: suspicion x sqrt(n). An effect seen on more maps is better
    evidence (as a mean's z grows with sqrt(n)): a pure handful does not outrank a large group."""
    return suspicion * float(np.sqrt(n))


@dataclass
class Audit:
    strategies: dict[int, list[Strategy]]   # class -> strategies, the best evidence of a shortcut first
    member_of: np.ndarray                   # (N,) index into flat(), -1 where not audited
    per_map: dict[str, np.ndarray]          # flip, control_flip, atypical, z_class, z_all, area, concentration, prob_drop,
                                            # x, y (the map of the data set: mosaic.layout)

    def flat(self) -> list[Strategy]:
        return [s for c in sorted(self.strategies) for s in self.strategies[c]]


# ------------------------------------------------------------------------------------------------
# Per map: the hot spot, what filling it does, what it holds

def smoothing(side: int) -> int:
    """Box-filter width that smooths a map as 3 px do at 28 (odd)."""
    return 2 * max(1, round(side / 28)) + 1


def hot_spots(maps: torch.Tensor) -> torch.Tensor:
    """bool (N, H, W): the pixels whose box-smoothed positive relevance is at least HOT x the peak's,
    wherever they are (not only round the peak: a ring or a pen stroke through the image is one
    spot, and half of a ring still decides). maps: (N, H, W) signed pixel scores."""
    pos = maps.clamp(min=0).float()[:, None]
    k = smoothing(maps.shape[-1])
    smooth = F.avg_pool2d(pos, k, 1, k // 2, count_include_pad=False)[:, 0]
    peak = smooth.flatten(1).max(1).values
    return (smooth >= HOT * peak[:, None, None]) & (peak[:, None, None] > 0)


def grow(masks: torch.Tensor, px: int) -> torch.Tensor:
    """Each mask grown by px pixels (8-neighbours)."""
    return F.max_pool2d(masks[:, None].float(), 2 * px + 1, 1, px)[:, 0].bool() if px else masks


def boxes(masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each mask's bounding box: first and last row (y0, y1) and column (x0, x1), and whether it has
    a pixel at all (an empty mask's box is meaningless)."""
    rows, cols = masks.any(2), masks.any(1)
    first = lambda a: a.float().argmax(1).long()
    h, w = masks.shape[-2:]
    return first(rows), h - 1 - first(rows.flip(1)), first(cols), w - 1 - first(cols.flip(1)), rows.any(1)


def uniforms(seeds, k: int) -> torch.Tensor:
    """(N, k) float64 in [0, 1), k per seed from splitmix64 of (seed, j): each map's draws depend on
    its own seed alone, whatever else is in the batch, and need no generator per map."""
    with np.errstate(over="ignore"):
        z = np.asarray(seeds).astype(np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53)


def translate(a: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """(N, T, H, W): each (H, W) plane of `a` moved by each of its T moves (dy, dx: (N, T)), zeros
    where a pixel comes from outside the image."""
    n, h, w = a.shape
    ys = torch.arange(h)[None, None, :, None] - dy[:, :, None, None]
    xs = torch.arange(w)[None, None, None, :] - dx[:, :, None, None]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    picked = a[torch.arange(n)[:, None, None, None], ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
    return torch.where(inside, picked, torch.zeros((), dtype=a.dtype))


def shifts(masks: torch.Tensor, seeds, tries: int = 8, batch: int = 512) -> torch.Tensor:
    """(N, 2) moves (dy, dx) that take each mask to another place of its image, whole inside it: of
    `tries` seeded draws, the first that overlaps the original least ((0, 0) for an empty mask)."""
    n, h, w = masks.shape
    y0, y1, x0, x1, has = boxes(masks)
    u = uniforms(seeds, 2 * tries).view(n, tries, 2)
    dy = (u[..., 0] * (h - (y1 - y0))[:, None]).long() - y0[:, None]  # in [-y0, h - 1 - y1]
    dx = (u[..., 1] * (w - (x1 - x0))[:, None]).long() - x0[:, None]
    out = torch.zeros(n, 2, dtype=torch.int64)
    for s in range(0, n, batch):  # batches bound the (batch, tries, H, W) candidates' memory
        m = masks[s:s + batch]
        overlap = (translate(m, dy[s:s + batch], dx[s:s + batch]) & m[:, None]).flatten(2).sum(2)
        pick = overlap.argmin(1, keepdim=True)  # the first of the least overlapping
        out[s:s + batch] = torch.cat([dy[s:s + batch].gather(1, pick), dx[s:s + batch].gather(1, pick)], 1)
    return torch.where(has[:, None], out, 0)


def shift(a: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """Each (H, W) plane of a moved by its (dy, dx) of moves (N, 2), zeros where it comes from outside."""
    return translate(a, moves[:, :1], moves[:, 1:])[:, 0]


def content(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, 6): the weighted means of each image's R, G, B (0-1), of its texture (the absolute
    Laplacian of the grey image) and of its chromaticity R - G and B - G (a yellow-brown cast or a
    green ink is off H&E's pink-purple axis even where its brightness is not).
    images: uint8 (N, C, H, W); weights: (N, H, W), >= 0."""
    x = images.float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    grey = x.mean(1, keepdim=True)
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
    texture = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), lap).abs()
    w = weights.float()[:, None]
    total = w.sum((2, 3)).clamp(min=1e-12)
    chroma = torch.stack([x[:, 0] - x[:, 1], x[:, 2] - x[:, 1]], 1)  # H&E is pink to purple: R and B above G
    return torch.cat([(x * w).sum((2, 3)), (texture * w).sum((2, 3)), (chroma * w).sum((2, 3))], 1) / total


def signed_z(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(value - median) / (1.4826 MAD) per column, median and MAD of `reference`. A MAD under 1e-3
    counts as 1e-3."""
    med = reference.median(0).values
    mad = (reference - med).abs().median(0).values * 1.4826
    return (values - med) / mad.clamp(min=1e-3)


def robust_z(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, the largest robust z-score (signed_z) in absolute value over the columns."""
    return signed_z(values, reference).abs().max(1).values


def fill(x: torch.Tensor, regions: torch.Tensor, seeds, tol: float = TOL, noise: float = NOISE) -> torch.Tensor:
    """ROAD's noisy linear imputation (road.impute) of each region, solved on a window round it
    rather than the whole image: the removed pixels' equations involve only their neighbours, so a
    window with a pixel of margin (or the image's own edge) gives the same solution. Windows are
    bucketed by size (multiples of 4 px) so each bucket is one batched solve. x: (N, C, H, W) model
    input; regions: bool (N, H, W); an empty region leaves its image as it is."""
    n, c, h, w = x.shape
    out = x.clone()
    y0, y1, x0, x1, has = boxes(regions)
    has &= ~regions.flatten(1).all(1)
    need = torch.maximum(y1 - y0, x1 - x0) + 3  # the extent plus a pixel of margin on each side
    side = torch.clamp(4 * torch.ceil(need / 4), max=min(h, w)).long()
    for s in torch.unique(side[has]).tolist():
        rows = torch.nonzero(has & (side == s))[:, 0]
        oy = torch.clamp(y0[rows] - 1, 0, h - s).long()
        ox = torch.clamp(x0[rows] - 1, 0, w - s).long()
        iy, ix = (oy[:, None] + torch.arange(s))[:, :, None], (ox[:, None] + torch.arange(s))[:, None, :]
        r = rows[:, None, None]
        window = x[r, :, iy, ix].permute(0, 3, 1, 2)  # (m, C, s, s)
        filled = impute(window, regions[r, iy, ix], noise, [seeds[i] for i in rows.tolist()], tol=tol)
        out[r, :, iy, ix] = filled.permute(0, 2, 3, 1)
    return out


@torch.no_grad()
def class_probability(model, images: torch.Tensor, classes: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(N,) the softmax probability of each image's class, images uint8 as the model sees them."""
    device = next(model.parameters()).device
    return torch.cat([torch.softmax(model(normalize(images[s:s + batch]).to(device).contiguous(
        memory_format=torch.channels_last)).float(), 1).gather(1, classes[s:s + batch, None].to(device))[:, 0].cpu()
        for s in range(0, len(images), batch)])


@torch.no_grad()
def causal_test(model, images: torch.Tensor, regions: torch.Tensor, classes: torch.Tensor, seeds,
                before: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Fill each region (fill()): does the prediction leave its class, and how much does the class's
    probability fall from `before` (class_probability of the unfilled images)? (bool (N,), float (N,));
    an empty region changes nothing."""
    flips, after = [], []
    device = next(model.parameters()).device
    for s in range(0, len(images), batch):
        x = normalize(images[s:s + batch]).to(device)
        filled = fill(x, regions[s:s + batch].to(device), seeds[s:s + batch])
        p = torch.softmax(model(filled.contiguous(memory_format=torch.channels_last)).float(), 1)
        c = classes[s:s + batch].to(device)
        flips.append((p.argmax(1) != c).cpu())
        after.append(p.gather(1, c[:, None])[:, 0].cpu())
    return torch.cat(flips).numpy(), (before - torch.cat(after)).numpy()


# ------------------------------------------------------------------------------------------------
# What each map points at, and the strategies

@torch.no_grad()
def describe(model, layer, images: torch.Tensor, maps: torch.Tensor, kind: str, batch: int = 512) -> np.ndarray:
    """(N, D) unit vectors, one per map. "evidence": the layer's activations averaged over space with
    the map's positive part (pooled to the layer's grid) as weights, so two maps that point at the
    same kind of thing are close wherever it is; "spray": the positive map itself, average-pooled to
    8x8 (SpRAy's downsampled heatmaps)."""
    pos = maps.clamp(min=0).float()[:, None]
    if kind == "spray":
        v = F.adaptive_avg_pool2d(pos, 8).flatten(1)
    elif kind == "evidence":
        device, found, out = next(model.parameters()).device, [], []
        hook = layer.register_forward_hook(lambda m, i, o: found.append(o.float()))
        try:
            for s in range(0, len(images), batch):
                found.clear()
                model(normalize(images[s:s + batch]).to(device).contiguous(memory_format=torch.channels_last))
                a = found[0]
                w = F.adaptive_avg_pool2d(pos[s:s + batch].to(device), a.shape[-2:])
                w = torch.where(w.sum((2, 3), keepdim=True) > 0, w, torch.ones_like(w))
                out.append(((a * w).sum((2, 3)) / w.sum((2, 3))).cpu())
        finally:
            hook.remove()
        v = torch.cat(out)
    else:
        raise ValueError(f"features must be one of {FEATURES}, got {kind!r}")
    return F.normalize(v, dim=1).numpy().astype(np.float64)


def knn_graph(v: np.ndarray, k: int):
    """Symmetric k-nearest-neighbour affinities (scipy sparse) of unit vectors: exp(-d^2 / (s_i s_j))
    on the Euclidean distances d to each row's k nearest, s_i the distance to row i's k-th nearest
    (Zelnik-Manor and Perona's local scaling, 2004), so tight and loose groups are cut alike."""
    from sklearn.neighbors import kneighbors_graph
    g = kneighbors_graph(v, min(k, len(v) - 1), mode="distance", include_self=False).tocsr()
    scale = np.maximum(g.max(1).toarray()[:, 0], 1e-6)
    rows = np.repeat(np.arange(len(v)), np.diff(g.indptr))
    g.data = np.exp(-g.data ** 2 / (scale[rows] * scale[g.indices]))
    return g.maximum(g.T)


def n_strategies(graph, k_max: int = K_MAX) -> int:
    """The eigengap: the k (1..k_max) after which the normalised Laplacian's sorted eigenvalues
    jump the most (SpRAy's rule)."""
    from scipy.sparse.csgraph import laplacian
    lap = laplacian(graph.astype(np.float64), normed=True).toarray()
    ev = np.linalg.eigvalsh(lap)[:k_max + 1]
    return int(np.argmax(np.diff(ev)) + 1)


def merge_overlapping(v: np.ndarray, graph, labels: np.ndarray, joined: float = JOINED,
                      k: int = NEIGHBOURS) -> np.ndarray:
    """Merge clusters that are one group cut in pieces. The eigengap can split one continuous group
    (an ink mark on fat and on tumour; a line of maps from faint to strong) into pieces that are not
    strategies of their own. Two clusters are one while they overlap, (s_A + s_B) / |c_A - c_B| > 1
    (Davies and Bouldin's similarity: s the mean distance of a cluster's rows to its centre c), or
    while the graph joins them: the conductance cut(A, B) / min(vol A, vol B), of A the cluster of
    the smaller volume, beyond the floor a k-nearest-neighbour graph forces on a cluster of m < k + 1
    rows (each row has k neighbours, at most m - 1 of them inside: a share f = (k - m + 1) / k of its
    edges leaves the cluster however apart it is), (phi - f) / (1 - f) > `joined`; without the
    correction a small cluster is joined to its nearest one however apart they are. The pair that
    is most one merges first, until no pair is. graph: the k-nearest-neighbour graph of v (knn_graph)."""
    labels = np.unique(labels, return_inverse=True)[1]
    while labels.max() > 0:
        one_hot = np.eye(labels.max() + 1)[labels]
        between = one_hot.T @ (graph @ one_hot)  # cut(A, B) off the diagonal, within-weight on it
        vol, size = between.sum(1), one_hot.sum(0)
        smaller = np.where(vol[:, None] <= vol[None, :], size[:, None], size[None, :])
        floor = np.clip((k - smaller + 1) / k, 0.0, 0.99)
        phi = (between / np.minimum(vol[:, None], vol[None, :]).clip(min=1e-12) - floor) / (1 - floor)
        centre = (one_hot.T @ v) / size[:, None]
        spread = np.array([np.linalg.norm(v[labels == j] - centre[j], axis=1).mean() for j in range(len(centre))])
        apart = np.linalg.norm(centre[:, None] - centre[None], axis=2)
        overlap = (spread[:, None] + spread[None]) / apart.clip(min=1e-12)
        one = np.maximum(overlap, phi / joined)
        np.fill_diagonal(one, 0)
        a, b = np.unravel_index(np.argmax(one), one.shape)
        if one[a, b] <= 1:
            break
        labels = np.unique(np.where(labels == max(a, b), min(a, b), labels), return_inverse=True)[1]
    return labels


def cluster(v: np.ndarray, seed: int = 0) -> np.ndarray:
    """Strategy labels (0..k-1) of the rows of v: spectral clustering of the k-NN graph, k by the
    eigengap; above MAX_EIGEN rows, a seeded sample is clustered and each other row takes the
    majority label of its NEIGHBOURS nearest sampled rows."""
    from sklearn.cluster import spectral_clustering
    from sklearn.neighbors import NearestNeighbors
    if len(v) < MIN_CLUSTERED:
        return np.zeros(len(v), np.int64)
    fit = np.sort(np.random.default_rng(seed).permutation(len(v))[:MAX_EIGEN])
    graph = knn_graph(v[fit], NEIGHBOURS)
    k = n_strategies(graph)
    labels = np.zeros(len(v), np.int64)
    if k > 1:
        with warnings.catch_warnings():  # a graph in pieces is the clearest case of separate strategies
            warnings.filterwarnings("ignore", "Graph is not fully connected")
            found = spectral_clustering(graph, n_clusters=k, random_state=seed, assign_labels="cluster_qr")
        labels[fit] = merge_overlapping(v[fit], graph, found)
    if len(fit) < len(v):
        rest = np.setdiff1d(np.arange(len(v)), fit)
        near = NearestNeighbors(n_neighbors=NEIGHBOURS).fit(v[fit]).kneighbors(v[rest], return_distance=False)
        labels[rest] = [np.bincount(labels[fit][row]).argmax() for row in near]
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def recruit(groups: list[np.ndarray], alarm: list[bool], strength: list[float], flip: np.ndarray,
            atypical: np.ndarray, direction: np.ndarray) -> list[np.ndarray]:
    """The maps a shortcut decided outside its strategy. Clustering groups a class's maps by what the
    model sees at their hot spots, and a mark on other tissue can look like that tissue's maps to it:
    a debris image called background because of a green blob lies with the background images that
    carry the blob and are background with or without it. So each alarmed group (the largest
    strength, its evidence(), first) takes in, from the groups that raise no alarm, every map whose
    own hot spot decided its prediction (flip), is unlike tissue (atypical) and unlike it the same
    way: its content's signed z-scores (direction, (N, d)) at a positive cosine with their mean over
    the group's atypical maps. Returns the groups, empty ones dropped; indices are rows of flip etc."""
    groups = [np.asarray(g) for g in groups]
    unit = direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    cold = [j for j, a in enumerate(alarm) if not a]
    for j in sorted((j for j, a in enumerate(alarm) if a), key=lambda j: -strength[j]):
        way = direction[groups[j][atypical[groups[j]]]].mean(0)
        for t in cold:
            m = groups[t]
            taken = flip[m] & atypical[m] & (unit[m] @ way > 0)
            groups[j], groups[t] = np.concatenate([groups[j], m[taken]]), m[~taken]
    return [g for g in groups if len(g)]


# ------------------------------------------------------------------------------------------------
# The audit

def audit_maps(model, layer, images: torch.Tensor, maps: torch.Tensor, classes, seeds, features: str = "evidence",
               n_exemplars: int = 8) -> Audit:
    """Audit N maps: images uint8 (N, C, H, W) as the model sees them, maps (N, [C,] H, W) of the
    class each explains (`classes`, the predicted class), seeds one per map (imputation noise and the
    control's place). model: eval mode; layer: its Grad-CAM layer (features "evidence")."""
    maps = torch.as_tensor(maps).float()
    maps = maps.sum(1) if maps.ndim == 4 else maps
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.int64)
    seeds = [int(s) for s in seeds]
    if not (len(images) == len(maps) == len(classes) == len(seeds)):
        raise ValueError(f"audit: {len(images)} images, {len(maps)} maps, {len(classes)} classes and {len(seeds)} "
                         "seeds; expected one of each per map")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"audit: maps of {tuple(maps.shape[-2:])} px for images of {tuple(images.shape[-2:])} px")
    spot = hot_spots(maps)
    pos = maps.clamp(min=0)
    total = pos.sum((1, 2))
    concentration = torch.where(total > 0, (pos * spot).sum((1, 2)) / total.clamp(min=1e-30), 0).numpy()
    area = spot.float().mean((1, 2)).numpy()
    region = grow(spot, GROW * max(1, round(images.shape[-1] / 28)))
    moves = shifts(region, [s + 1 for s in seeds])
    control = shift(region, moves)
    before = class_probability(model, images, classes)
    flip, drop = causal_test(model, images, region, classes, seeds, before)
    control_flip, _ = causal_test(model, images, control, classes, [s + 2 for s in seeds], before)
    # What the hot spot holds, weighted by its relevance, against the same weights elsewhere in the
    # same images: unlike the tissue of its class *and* of the whole selection (ink is unlike any
    # tissue; the dark nuclei a class is recognised by are like the tissue of some class).
    weights = pos * spot
    inside, elsewhere = content(images, weights), content(images, shift(weights, moves))
    direction = signed_z(inside, elsewhere)
    z_all, z_class = direction.abs().max(1).values.numpy(), np.zeros(len(maps))
    by_class = {c: np.flatnonzero(classes.numpy() == c) for c in np.unique(classes.numpy()).tolist()}
    for rows in by_class.values():
        z_class[rows] = robust_z(inside[rows], elsewhere[rows]).numpy()
    atypical = np.minimum(z_class, z_all) > ATYPICAL
    vectors = describe(model, layer, images, maps, features)
    xy = layout(vectors)  # the map of the data set the report draws (mosaic.py)
    member_of = np.full(len(maps), -1, np.int64)
    per_class: dict[int, list[Strategy]] = {}

    def strategy(c: int, members: np.ndarray) -> Strategy:
        centre = vectors[members].mean(0)
        return Strategy(
            cls=c, members=members, flip=float(flip[members].mean()),
            control_flip=float(control_flip[members].mean()), atypical=float(atypical[members].mean()),
            area=float(np.median(area[members])), concentration=float(np.median(concentration[members])),
            prob_drop=float(drop[members].mean()),
            exemplars=members[np.argsort(-(vectors[members] @ centre), kind="stable")[:n_exemplars]])

    for c, rows in by_class.items():
        labels = cluster(vectors[rows])
        found = [strategy(c, rows[labels == k]) for k in range(labels.max() + 1)]
        groups = recruit([s.members for s in found], [s.alarm for s in found], [s.evidence for s in found],
                         flip, atypical, direction.numpy())
        found = [strategy(c, np.sort(g)) for g in groups]
        per_class[c] = sorted(found, key=lambda s: (-s.evidence, -s.flip, -s.n))
    result = Audit(per_class, member_of, {
        "flip": flip, "control_flip": control_flip, "atypical": atypical, "z_class": z_class, "z_all": z_all,
        "area": area, "concentration": concentration, "prob_drop": drop, "x": xy[:, 0], "y": xy[:, 1]})
    for j, s in enumerate(result.flat()):
        member_of[s.members] = j
    return result

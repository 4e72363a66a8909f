"""For some query images, the training images nearest in a hidden layer's feature space
(Euclidean distance), the paper's Figure 4.

Features are the output of the layer ``layer`` (default ``fc7``; in the bundled recipes that is
the fully connected layer before its ReLU: name the ReLU's id, e.g. ``relu7``, to use the
rectified activations). Queries are ``queries`` images spread evenly over ``query_split``
(the validation set by default; with ``"train"``, over the training images searched). The
training database is the whole training split, or its first ``train_limit`` images when that
is set (ImageNet's 1.2 M x 4096 features need 20 GB).
Distances are computed by differences (not the ``|a|^2 + |b|^2 - 2ab`` shortcut), so an
image's distance to itself is exactly 0. Ties are broken by the lower training index.

Writes ``neighbours.png`` (one row per query: the query, then its ``k`` neighbours, nearest
first; each image under its class name, neighbours with their distance) and ``neighbours.json``
(indices into the splits, labels and distances).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v

from convnet.core import BuildContext, EvalContext, Evaluator, RecipeError
from convnet.plugins.evaluate.common import (
    feature_network,
    new_figure,
    require_layer,
    to_display,
    write_figure,
    write_json,
)


@attrs.define
class NeighboursOptions:
    layer: str = "fc7"
    queries: int = attrs.field(default=8, validator=[v.gt(0), v.le(1000)])
    k: int = attrs.field(default=6, validator=[v.gt(0), v.le(100)])
    query_split: str = attrs.field(default="val", validator=v.in_(("train", "val")))
    train_limit: int = attrs.field(default=0, validator=v.ge(0))
    cell: int = attrs.field(default=64, validator=[v.ge(8), v.le(512)])


def query_indices(n: int, queries: int) -> list[int]:
    """``queries`` indices spread evenly over ``range(n)`` (all of them when n is smaller)."""
    if queries >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (queries - 1)) if queries > 1 else 0 for i in range(queries)})


def nearest(
    queries: torch.Tensor, database: torch.Tensor, k: int, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, positions) of the ``k`` database rows nearest each query row, nearest first,
    ties to the lower position."""
    q = queries.double()
    parts = [
        torch.cdist(q, database[i : i + chunk].double(), compute_mode="donot_use_mm_for_euclid_dist")
        for i in range(0, len(database), chunk)
    ]
    dist = torch.cat(parts, dim=1)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return dist.gather(1, order), order


def labelled(
    rows: list[list[torch.Tensor]], results: list[dict[str, Any]], names: list[str], layer: str, cell: int
) -> Any:
    """One row per query: the query, then its neighbours; every image under its class name,
    neighbours with their distance, the columns headed (query, 1, 2, ...)."""
    cols = max(len(r) for r in rows)
    fig = new_figure(cols * (cell + 40) + 60, len(rows) * (cell + 48) + 60)
    height = fig.bbox.height
    grid = fig.add_gridspec(
        len(rows), cols, left=0.06, right=0.99, top=1 - 45 / height, bottom=28 / height, hspace=0.55, wspace=0.15
    )
    for r, (images, res) in enumerate(zip(rows, results)):
        for c, image in enumerate(images):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(to_display(image), interpolation="nearest" if image.shape[-1] < cell else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            label = res["label"] if c == 0 else res["labels"][c - 1]
            name = names[label] if 0 <= label < len(names) else str(label)
            ax.set_xlabel(name if c == 0 else f"{name} ({res['distances'][c - 1]:.3g})", fontsize=7)
            if r == 0:
                ax.set_title("query" if c == 0 else f"{c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{res['split']} #{res['query']}", fontsize=7)
                for side in ax.spines.values():
                    side.set_color("#d62728")
                    side.set_linewidth(2)
    fig.suptitle(f"nearest training images in {layer} space (Euclidean; label and distance under each)", fontsize=10)
    return fig


class Neighbours(Evaluator):
    when = "end"

    def __init__(self, options: NeighboursOptions, ctx: BuildContext) -> None:
        self.options = options
        self.path = ctx.path
        require_layer(ctx, "neighbours", "layer", options.layer)

    def features(
        self, ctx: EvalContext, split: str, indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, labels, indices) of those samples, gathered from all processes, sorted by index."""
        net = feature_network(ctx)
        feats, labels, idx = [], [], []
        with ctx.evaluating():
            for x, y, i in ctx.batches(split, indices=indices):
                if x.dim() == 5:  # several views per image: the centre one (torchvision's ten-crop order)
                    x = x[:, 4]
                feats.append(net.features(x, self.options.layer).flatten(1).float().cpu())
                labels.append(y)
                idx.append(i)
        f = torch.cat(feats) if feats else torch.empty(0, 0)
        y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        i = torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)
        f, y, i = ctx.strategy.all_gather_cat(f), ctx.strategy.all_gather_cat(y), ctx.strategy.all_gather_cat(i)
        order = torch.argsort(i)
        return f[order], y[order], i[order]

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        o = self.options
        n_train = len(ctx.splits.train)
        train_ids = list(range(min(n_train, o.train_limit) if o.train_limit else n_train))
        db, db_labels, db_index = self.features(ctx, "train", train_ids)
        if len(db) == 0:
            raise RecipeError(f"{self.path}: no readable training images to search")
        if o.query_split == "train":  # queries from the database itself: reuse its features
            wanted = [int(db_index[i]) for i in query_indices(len(db_index), o.queries)]
            pos = torch.searchsorted(db_index, torch.tensor(wanted))
            qf, q_labels, q_index = db[pos], db_labels[pos], db_index[pos]
        else:
            wanted = query_indices(len(ctx.splits.val), o.queries)
            qf, q_labels, q_index = self.features(ctx, "val", wanted)
        if len(qf):
            dist, pos = nearest(qf, db, min(o.k, len(db)))
        # else every query was unreadable (skipped and reported as such): no results, no figure
        results = [
            {
                "query": int(q_index[r]),
                "split": o.query_split,
                "label": int(q_labels[r]),
                "neighbours": [int(db_index[p]) for p in pos[r]],
                "labels": [int(db_labels[p]) for p in pos[r]],
                "distances": [float(d) for d in dist[r]],
            }
            for r in range(len(q_index))
        ]
        agree = [sum(lbl == res["label"] for lbl in res["labels"]) / len(res["labels"]) for res in results]
        if ctx.out is not None:
            write_json(
                ctx.out,
                "neighbours.json",
                {"layer": o.layer, "distance": "euclidean", "train_images": len(db), "queries": results},
            )
            qsplit, tsplit = getattr(ctx.splits, o.query_split), ctx.splits.train
            rows = [[_image(qsplit, res["query"])] + [_image(tsplit, j) for j in res["neighbours"]] for res in results]
            names = ctx.splits.classes or [str(i) for i in range(ctx.recipe.model.num_classes)]
            if rows:
                write_figure(ctx.out, "neighbours.png", labelled(rows, results, names, o.layer, o.cell))
        return {"neighbours_label_agreement": float(np.mean(agree)) if agree else float("nan")}


def _image(dataset: Any, index: int) -> torch.Tensor:
    sample = dataset[index]
    if sample is None:
        return torch.zeros(3, 8, 8, dtype=torch.uint8)
    return torch.as_tensor(sample[0])

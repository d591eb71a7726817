"""Point labels that never overlap: each label goes to the free spot nearest its point.

The label's extent is measured with the figure's renderer, candidate spots are searched on rings of
growing radius around the point, and a spot is free when its box (padded) meets no placed label, no
point marker and stays inside the axes. A label set away from its point gets a thin leader line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

LABEL_GID = "point-label"  # marks the label texts (the leader lines are separate, text-less annotations)
PAD_PX = 2.0  # clearance around each label box, in pixels


def _ring(radius: float, width: float, height: float, step: float) -> np.ndarray:
    """Offsets (pixels) of a box centre from its point, around one ring, upper right first (where
    labels usually sit); the box's near edge lies about `radius` from the point."""
    count = max(8, int(2 * np.pi * radius / step))
    angles = np.pi / 4 + 2 * np.pi * np.arange(count) / count
    return np.column_stack([np.cos(angles) * (radius + width / 2), np.sin(angles) * (radius + height / 2)])


def _free_spot(centre: np.ndarray, size: np.ndarray, frame: np.ndarray, taken: np.ndarray,
               first: float, step: float, reach: float | None) -> np.ndarray | None:
    """The nearest free box (x0, y0, x1, y1) for a label of `size` about `centre`, within `reach`
    pixels of it (None: anywhere in the frame), or None."""
    limit = max(frame[2] - frame[0], frame[3] - frame[1]) if reach is None else reach
    radius = first
    while radius <= limit:
        centres = centre + _ring(radius, *size, step)
        boxes = np.hstack([centres - size / 2, centres + size / 2])
        inside = ((boxes[:, :2] >= frame[:2]) & (boxes[:, 2:] <= frame[2:])).all(axis=1)
        low, high = boxes[:, None, :2], boxes[:, None, 2:]  # candidates x taken, broadcast
        clash = ((low < taken[None, :, 2:]) & (high > taken[None, :, :2])).all(axis=2).any(axis=1)
        free = np.flatnonzero(inside & ~clash)
        if free.size:
            return boxes[free[0]]
        radius += step
    return None


def _edge_towards(box: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Where the segment from the box centre to the point leaves the box (the leader line's start)."""
    centre = (box[:2] + box[2:]) / 2
    delta = point - centre
    half = (box[2:] - box[:2]) / 2
    with np.errstate(divide="ignore"):
        scale = np.min(np.where(delta != 0, half / np.abs(delta), np.inf))
    return centre + delta * min(scale, 1.0)


def _gap(box: np.ndarray, point: np.ndarray) -> float:
    """Distance from a point to a box (0 inside it)."""
    return float(np.hypot(*np.maximum(np.maximum(box[:2] - point, point - box[2:]), 0)))


def place_labels(ax: Axes, anchors: Sequence[tuple[float, float]], texts: Sequence[str], *, fontsize: float = 7,
                 marker_px: float = 8.0, avoid: Sequence[tuple[float, float]] = (),
                 reach: float | None = None) -> list[Annotation] | None:
    """Annotate each anchor (data coordinates) with its text where no two labels overlap.

    Markers at the anchors and at `avoid` (other points drawn) are kept clear too. A label goes at
    most about `reach` pixels from its point (None: anywhere inside the axes). Returns the label texts, or
    None (having added nothing) when some label finds no free spot. Call it last: the axes' limits
    and position must be final, and the figure saved at its own dpi.
    """
    figure = ax.figure
    figure.canvas.draw()  # settles the axes' limits and position, which the spots are computed in
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).extents
    points = ax.transData.transform(np.asarray([*anchors, *avoid], dtype=float).reshape(-1, 2))
    taken = np.hstack([points - marker_px, points + marker_px])
    to_points = 72.0 / figure.dpi
    added, labels = [], []
    for (x, y), text, point in zip(anchors, texts, points, strict=False):
        label = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize,
                            ha="center", va="center", gid=LABEL_GID)
        added.append(label)
        extent = label.get_window_extent(renderer)
        size = np.array([extent.width, extent.height]) + 2 * PAD_PX
        box = _free_spot(point, size, frame, taken, first=2.0, step=max(size[1] / 2, 3.0), reach=reach)
        if box is None:
            for artist in added:
                artist.remove()
            return None
        centre = (box[:2] + box[2:]) / 2
        label.xyann = tuple((centre - point) * to_points)
        if _gap(box, point) > marker_px + 3:  # not beside its marker: a leader line says whose it is
            start = _edge_towards(box + [PAD_PX, PAD_PX, -PAD_PX, -PAD_PX], point)
            added.append(ax.annotate("", (x, y), xytext=tuple((start - point) * to_points),
                                     textcoords="offset points",
                                     arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0,
                                                 "shrinkB": 2}))
        taken = np.vstack([taken, box])
        labels.append(label)
    return labels


def label_boxes(ax: Axes) -> list[Bbox]:
    """The display-space boxes of the labels place_labels drew (for checking that none overlap)."""
    renderer = ax.figure.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in ax.texts if t.get_gid() == LABEL_GID]

"""Translation equivariance per layer: ``||f(Tx) - T'f(x)|| / ||f(x)||``.

``T`` moves the input by ``n`` pixels; ``T'`` moves a layer's map by ``n / stride`` units. Where
``n`` is not a multiple of the stride no integer ``T'`` exists (the map is sub-sampled: aliasing);
there the error is the smaller of the floor and ceiling shifts and the row is marked ``fractional``.

Every layer with a spatial output ``(N, C, H, W)`` gets a row, named by the layer with its map size
(``map_h`` x ``map_w``). A map is too small for a shift along an axis when it has a single unit
there or no more units than the feature shift ``k`` compared (:func:`measurable`): a 1x1 map cannot
show a shift error (rolling it by ``k`` changes nothing, so ``f(Tx)`` against ``f(x)`` would measure
invariance, not equivariance). Such rows say ``measurable = False`` and carry no error (NaN).
"""

from __future__ import annotations

import math

import torch

from probe.geometry.fields import LayerField
from probe.geometry.transforms import AXIS_DIM, overlap


def normalised_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` over the whole batch (NaN when empty or ``ref`` is all zero)."""
    if a.numel() == 0:
        return float("nan")
    den = ref.double().norm()
    return float((a.double() - ref.double()).norm() / den) if den > 0 else float("nan")


def has_map(y: torch.Tensor) -> bool:
    """A spatial output ``(N, C, H, W)`` (a row of the table; whether a shift can be seen on it is :func:`measurable`)."""
    return y.dim() == 4


def measurable(length: int, ks: list[int]) -> bool:
    """Whether a map ``length`` units long along the shifted axis can show an error of the feature shifts
    ``ks``: at least two units, and more than ``|k|`` (else a circular roll by ``k`` is the identity or
    wraps onto itself, and a zero-filled shift leaves nothing of ``f(x)`` to compare)."""
    return length >= 2 and all(abs(k) < length for k in ks)


def interior_units(f: LayerField, axis: str, length: int, image: int, n: int, k: int) -> torch.Tensor:
    """Units ``u`` (along ``axis``) of ``f(Tx)`` whose receptive field lies in the moved content and whose
    partner ``u - k`` in ``f(x)`` sees no padding: there border effects cannot explain an error, only
    sub-sampling can. Empty when the field is unknown or wider than what the image leaves."""
    if f.centre0 is None or f.trf is None:
        return torch.empty(0, dtype=torch.long)
    a = 0 if axis == "y" else 1
    c0, j, half = f.centre0[a], f.stride[a], (f.trf[a] - 1) / 2
    u = torch.arange(length)
    lo, hi = c0 + u * j - half, c0 + u * j + half
    lo_ref, hi_ref = lo - k * j, hi - k * j
    ok = (lo >= max(n, 0)) & (hi <= image - 1 + min(n, 0)) & (lo_ref >= 0) & (hi_ref <= image - 1)
    ok &= (u - k >= 0) & (u - k < length)
    return u[ok]


def equivariance_rows(base: dict[str, torch.Tensor], moved: dict[str, torch.Tensor], layers: list[str],
                      fields: dict[str, LayerField], types: dict[str, str], mode: str, axis: str, n: int,
                      image: int) -> list[dict]:
    """Rows for one shift: ``base``/``moved`` are the layers' outputs for ``x`` (``image`` pixels along
    ``axis``) and for ``x`` shifted by ``n`` pixels along ``axis`` with border ``mode``; layers without a
    spatial output (linear layers) are skipped, maps too small for the shift get ``measurable = False``."""
    dim = AXIS_DIM[axis]
    rows = []
    for name in layers:
        if name not in base or not has_map(base[name]):
            continue
        stride = fields[name].stride[0 if axis == "y" else 1]
        exact = n / stride
        fractional = abs(exact - round(exact)) > 1e-6
        ks = sorted({math.floor(exact), math.ceil(exact)}) if fractional else [round(exact)]
        length = base[name].shape[dim]
        ok = measurable(length, ks)
        nan = float("nan")
        if ok:
            errs = [(normalised_error(*overlap(moved[name], base[name], k, dim, mode)), k) for k in ks]
            finite = [e for e in errs if not math.isnan(e[0])]
            err, k = min(finite) if finite else errs[0]
            u = interior_units(fields[name], axis, length, image, n, k)
            err_in = normalised_error(moved[name].index_select(dim, u), base[name].index_select(dim, u - k))
        else:
            err, k, err_in, u = nan, ks[-1], nan, []
        rows.append({"layer": name, "type": types[name], "depth": layers.index(name), "mode": mode,
                     "axis": axis, "shift": int(n), "stride": float(stride), "feature_shift": int(k),
                     "feature_shift_exact": float(exact), "fractional": bool(fractional), "measurable": bool(ok),
                     "error": err, "error_interior": err_in, "interior_units": int(len(u)),
                     "map_size": int(length), "map_h": int(base[name].shape[-2]), "map_w": int(base[name].shape[-1])})
    return rows


COLUMNS = ["layer", "type", "depth", "mode", "axis", "shift", "stride", "feature_shift", "feature_shift_exact",
           "fractional", "measurable", "error", "error_interior", "interior_units", "map_size", "map_h", "map_w"]

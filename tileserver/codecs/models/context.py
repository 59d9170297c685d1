"""The KLT coder with a channel and checkerboard context model on top of its hyperprior.

:class:`~.klt.KLTHyper` predicts every latent's Gaussian from a side latent at
stride 32 alone, which cannot see what a block's own low frequencies or its
neighbours already say: the DC of a block is close to its neighbours' (JPEG's
DC prediction), and a block whose low frequencies are busy has busy high
frequencies too.  This model codes the latent in ordered passes (after He et
al. 2021, "Checkerboard context model", and He et al. 2022, "ELIC"):

* the KLT channels (ordered by variance) are cut into slices, e.g. ``0-4,
  4-12, 12-32, 32-96``;
* slice ``k`` is coded after slices ``< k``; in the first ``checkerboard``
  slices, the anchor positions (``(i + j)`` even) go first and the other half
  is then predicted from its four decoded anchor neighbours too;
* each pass's Gaussians are the hyperprior's plus a correction ``(d_mean,
  d_log_scale)`` computed by a small network, 3x3 convolution -> ReLU -> 1x1
  convolution, from the residuals ``y_hat - hyper_mean`` of what is already
  decoded (zeros elsewhere).  The last layer starts at zero, so a fresh model
  codes exactly like the hyperprior it is initialised from.

Exact decoding extends to the context: its inputs are residuals rounded onto
the activation grid, its weights sit on the synthesis's grids and bounds, and
each pass adds the clamped correction to the hyper-synthesis's exact output,
so encoder and decoder compute the same scale index and mean for every symbol
on every machine.  The cost is one small convolution and one rANS call per
pass (seven for four slices, three with checkerboard).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .factorized import _to_grid
from .int8 import LATENT_FRAC_BITS, QConv, _latent_halves, _value
from .klt import (
    _A_MAX,
    ACT_BITS,
    SCALE_LEVELS,
    SCALE_LOG_MIN,
    SCALE_LOG_STEP,
    KLTHyper,
    _bias,
    _conv,
    _fake_quant,
    _fake_quant_weight,
    _relu_grid_,
    exact_weights,
    round_about,
)

__all__ = [
    "CORRECTION_MAX",
    "FloatPasses",
    "Int8Passes",
    "Int8Shared",
    "KLTContext",
    "Passes",
    "anchor_mask",
    "grid_residual",
    "hyper_mean_clamped",
    "pass_gaussians",
    "pass_update",
    "warm_up",
]

#: corrections (and hyper means) are clamped to this before they are added: the sum stays exact
CORRECTION_MAX = 2.0**12


def anchor_mask(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``h x w`` mask of the checkerboard's anchor positions (``(i + j)`` even)."""
    i = torch.arange(h, device=device)[:, None]
    j = torch.arange(w, device=device)[None, :]
    return (i + j) % 2 == 0


#: one coding pass: slice index, channel range, and which positions it codes (None = all, True = anchors,
#: False = non-anchors)
Pass = tuple[int, int, int, bool | None]


class KLTContext(KLTHyper):
    """:class:`KLTHyper` plus a channel/checkerboard context model (see the module docstring).

    ``slices``: the channel boundaries between slices (ascending, inside ``1..M-1``);
    ``checkerboard``: how many of the first slices are coded in two checkerboard passes;
    ``ctx_width``: hidden width of each slice's context network.
    """

    #: the int8 context networks' activation ranges, one per slice (a buffer; only with ``int8_entropy``)
    int8_ctx_max: Tensor

    def __init__(
        self,
        M: int = 96,
        N: int = 64,
        widths: tuple[int, ...] | list[int] = (24, 16),
        step: float = 0.1,
        H: int = 64,
        slices: Sequence[int] = (4, 12, 32),
        checkerboard: int = 3,
        ctx_width: int = 16,
        int8: bool = False,
        int8_entropy: bool = False,
    ) -> None:
        super().__init__(M=M, N=N, widths=widths, step=step, H=H, int8=int8, int8_entropy=int8_entropy)
        bounds = [0, *(int(s) for s in slices), self.M]
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"slices must rise strictly inside 1..{self.M - 1}, got {list(slices)}")
        n_slices = len(bounds) - 1
        if not 0 <= checkerboard <= n_slices:
            raise ValueError(f"checkerboard must be 0..{n_slices}, got {checkerboard}")
        self.config.update(
            {"slices": list(bounds[1:-1]), "checkerboard": int(checkerboard), "ctx_width": int(ctx_width)}
        )
        self.bounds = bounds
        self.n_checkerboard = int(checkerboard)
        self.ctx_in = nn.ModuleList()
        self.ctx_out = nn.ModuleList()
        for k in range(n_slices):
            lo, hi = bounds[k], bounds[k + 1]
            c_in = lo + (hi - lo if k < checkerboard else 0)
            if 9 * c_in > 2**11:
                raise ValueError("too many context channels for exact float64 decoding")
            # A slice with nothing before it and no checkerboard has no context: a 1-channel
            # stand-in keeps the module lists aligned and is never called.
            self.ctx_in.append(nn.Conv2d(max(c_in, 1), ctx_width, 3, padding=1))
            out = nn.Conv2d(ctx_width, 2 * (hi - lo), 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(_bias(out))
            self.ctx_out.append(out)
        if self.int8_entropy:
            self.register_buffer("int8_ctx_max", torch.zeros(n_slices))

    # -- the coding order -------------------------------------------------
    def passes(self) -> list[Pass]:
        """The coding passes in order: (slice, first channel, end channel, positions)."""
        out: list[Pass] = []
        for k in range(len(self.bounds) - 1):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            if k < self.n_checkerboard:
                out += [(k, lo, hi, True), (k, lo, hi, False)]
            else:
                out.append((k, lo, hi, None))
        return out

    def _layers(self, k: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        """Slice ``k``'s context network: the 3x3 layer and the 1x1 layer."""
        c_in, c_out = self.ctx_in[k], self.ctx_out[k]
        assert isinstance(c_in, nn.Conv2d) and isinstance(c_out, nn.Conv2d)
        return c_in, c_out

    def _has_context(self, k: int) -> bool:
        return self.bounds[k] > 0 or k < self.n_checkerboard

    def _correction(
        self,
        k: int,
        prev: Tensor,
        own: Tensor | None,
        conv: Callable[[int, str, Tensor], Tensor],
        act: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """``(d_mean, d_log_scale)`` of slice ``k`` from the residuals decoded so far.

        ``prev``: ``B x lo x h x w`` residuals of the slices before ``k``; ``own``: slice
        ``k``'s residuals at its anchors, zero elsewhere (``None`` before they are
        decoded).  The 3x3 layer's weights are split by input: ``conv(k, part, x)`` runs
        part ``"prev"`` (with the bias), ``"own"`` (without) or the 1x1 ``"out"`` layer.
        Any partial sum of an exact layer is exact, so the split changes no bit, and a
        pass whose input is zero skips that part.
        """
        lo, hi = self.bounds[k], self.bounds[k + 1]
        b, _, h, w = prev.shape
        if not self._has_context(k):
            zero = prev.new_zeros(b, hi - lo, h, w)
            return zero, zero
        pre = conv(k, "prev", prev)
        if own is not None:
            pre = pre + conv(k, "own", own)
        out = conv(k, "out", act(pre)).clamp(-CORRECTION_MAX, CORRECTION_MAX)
        return out[:, : hi - lo], out[:, hi - lo :]

    def _split_layers(
        self, k: int, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
    ) -> dict[str, tuple[Tensor, Tensor | None, int]]:
        """Slice ``k``'s layers as ``(weight, bias, padding)`` per part (see :meth:`_correction`)."""
        lo = self.bounds[k]
        return {
            "prev": (w_in[:, :lo].contiguous(), b_in, 1),
            "own": (w_in[:, lo:].contiguous(), None, 1),
            "out": (w_out, b_out, 0),
        }

    # -- training ---------------------------------------------------------
    def _float_conv(self, k: int, part: str, x: Tensor) -> Tensor:
        c_in, c_out = self._layers(k)
        w_in, w_out = c_in.weight, c_out.weight
        if self.int8_entropy and self._int8_ready():
            # As the int8 decoder: int8 weights per output channel (the 3x3 layer's scale spans
            # both of its parts), residual inputs on the latent grid.
            w_in, w_out = _fake_quant_weight(w_in), _fake_quant_weight(w_out)
            if part != "out":
                x = _fake_quant(x, 2.0**-LATENT_FRAC_BITS)
        w, b, pad = self._split_layers(k, w_in, _bias(c_in), w_out, _bias(c_out))[part]
        if w.shape[1] == 0:
            return _bias_only(b, x)
        out: Tensor = F.conv2d(x, w, b, padding=pad)
        return out

    def _float_act(self, k: int) -> Callable[[Tensor], Tensor]:
        if not self.int8_entropy:
            return F.relu
        return lambda t: self._act_q(F.relu(t), "int8_ctx_max", k)

    def _int8_ranges(self) -> list[tuple[Tensor, list[int]]]:
        if not self.int8_entropy:
            return super()._int8_ranges()
        used = [k for k in range(len(self.ctx_in)) if self._has_context(k)]
        return [*super()._int8_ranges(), (self.int8_ctx_max, used)]

    def latent_params(
        self, y: Tensor, means: Tensor, log_scales: Tensor, rounding: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training: (means, log-scales, rounded latent) of ``y`` pass by pass, as decoding sees them.

        Each pass rounds its latents about its own means (``klt.round_about``: straight-through,
        or relaxed by ``rounding``) before a later pass reads them, in the order the decoder follows.
        """
        hyper_means = hyper_mean_clamped(means)
        anchors = anchor_mask(y.shape[2], y.shape[3], y.device).to(y.dtype)
        done: list[Tensor] = []  # residuals of the finished slices
        out_means, out_logs, out_y = [], [], []
        for k in range(len(self.bounds) - 1):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            prev = torch.cat(done, dim=1) if done else y.new_zeros(y.shape[0], 0, *y.shape[2:])
            yk, hm = y[:, lo:hi], hyper_means[:, lo:hi]
            mu_k = ls_k = yh_k = None
            own = None
            for where in (True, False) if k < self.n_checkerboard else (None,):
                d_mean, d_log = self._correction(k, prev, own, self._float_conv, self._float_act(k))
                mu, ls = hm + d_mean, log_scales[:, lo:hi] + d_log
                yh = round_about(yk, mu, rounding)
                if where is None:
                    mu_k, ls_k, yh_k = mu, ls, yh
                elif where:
                    own = (yh - hm) * anchors
                    mu_k, ls_k, yh_k = mu * anchors, ls * anchors, yh * anchors
                else:
                    rest = 1.0 - anchors
                    assert mu_k is not None and ls_k is not None and yh_k is not None
                    mu_k, ls_k, yh_k = mu_k + mu * rest, ls_k + ls * rest, yh_k + yh * rest
            assert mu_k is not None and ls_k is not None and yh_k is not None
            out_means.append(mu_k)
            out_logs.append(ls_k)
            out_y.append(yh_k)
            done.append(yh_k - hm)
        return torch.cat(out_means, dim=1), torch.cat(out_logs, dim=1), torch.cat(out_y, dim=1)

    # -- exact inference --------------------------------------------------
    def _context_convs(self) -> list[nn.Conv2d]:
        return [c for k in range(len(self.ctx_in)) if self._has_context(k) for c in self._layers(k)]

    def _exact_convs(self) -> list[tuple[nn.Conv2d, float]]:
        return [*super()._exact_convs(), *((c, 1.0) for c in self._context_convs())]

    def exact_context(self, device: torch.device) -> Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor]]:
        """Order-independent corrections: ``(k, prev, own)`` -> float64 ``(d_mean, d_log_scale)``.

        ``prev`` and ``own`` as in :meth:`_correction`, on the activation grid (see
        :func:`grid_residual`).
        """
        if self.int8_entropy:
            return self._int8_context(device)
        parts = {}
        for k in range(len(self.ctx_in)):
            if self._has_context(k):
                (w_in, b_in), (w_out, b_out) = map(exact_weights, self._layers(k))
                parts[k] = self._split_layers(k, *(t.to(device) for t in (w_in, b_in, w_out, b_out)))

        def conv(k: int, part: str, x: Tensor) -> Tensor:
            w, b, pad = parts[k][part]
            if w.shape[1] == 0:
                return _bias_only(b, x)
            return _conv(x, w, b, pad)

        def run(k: int, prev: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
            return self._correction(k, prev, own, conv, _relu_grid_)

        return run

    def _check_int8(self) -> None:
        super()._check_int8()
        if self.int8_entropy:
            self._int8_context(torch.device("cpu"))

    def _int8_context_layers(self) -> dict[int, tuple[QConv, QConv, QConv]]:
        """Per slice with a context: its 3x3 layer's rows for the earlier slices alone (the anchor
        and whole-slice passes' input), the whole 3x3 layer (the other passes': the earlier slices
        and this slice's anchors as one input), and the 1x1 layer; on the model's device."""
        from . import int8 as q8

        if not self._int8_ready():
            raise ValueError("int8 context is not calibrated (act_max is zero)")
        layers = {}
        for k in range(len(self.ctx_in)):
            if not self._has_context(k):
                continue
            unit = float(self.int8_ctx_max[k]) / 255.0
            (w_in, b_in), (w_out, b_out) = map(exact_weights, self._layers(k))
            first = q8.quantize_conv(
                w_in, b_in, in_unit=2.0**-LATENT_FRAC_BITS, halves=True, out_unit=unit, name=f"ctx_in.{k}"
            )
            out = q8.quantize_conv(
                w_out, b_out, in_unit=unit, halves=False, out_unit=2.0**-q8.VALUE_BITS, name=f"ctx_out.{k}"
            )
            # The earlier slices' rows, with the same per-channel scale, bias and multiplier
            # (any partial sum is exact).
            prev_rows = first.w.reshape(3, 3, -1, first.w.shape[1])[:, :, : self.bounds[k]]
            prev = q8.QConv(prev_rows.reshape(-1, first.w.shape[1]).contiguous(), first.bias, first.mult, 3, True)
            layers[k] = (prev, first, out)
        return layers

    def _int8_context(self, device: torch.device) -> Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor]]:
        """:meth:`exact_context` in integers (``int8.py``): residuals on the int16 latent grid,
        int8 products, the hidden layer on uint8, corrections on the ``2**-VALUE_BITS`` grid.

        The float path's split of the 3x3 layer by input becomes a choice of rows: the anchor
        pass reads the earlier slices only, the other passes the earlier slices and this one's
        anchors as one input."""
        from . import int8 as q8

        layers = {k: tuple(q.to(device) for q in qs) for k, qs in self._int8_context_layers().items()}

        def run(k: int, prev: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
            c = self.bounds[k + 1] - self.bounds[k]
            if k not in layers:
                zero = prev.new_zeros(prev.shape[0], c, *prev.shape[2:])
                return zero, zero
            only_prev, both, out = layers[k]
            x, first = (prev, only_prev) if own is None else (torch.cat([prev, own], dim=1), both)
            d = q8.small_conv(x, first, out, limit=CORRECTION_MAX)
            return d[:, :c], d[:, c:]

        return run

    def pass_coder(self, device: torch.device) -> Callable[[int, int], Passes]:
        """``(h, w) ->`` a fresh :class:`Passes` for one ``h x w`` latent: what the entropy coder
        calls pass by pass.  :class:`Int8Passes` for an ``int8_entropy`` model on CPU (the same
        values, fused and computed only where a pass codes), else :class:`FloatPasses`."""
        if self.int8_entropy and device.type == "cpu":
            shared = Int8Shared(self._int8_context_layers())
            Int8Passes.warm_up()
            return lambda h, w: Int8Passes(shared, self.bounds, h, w)
        context = self.exact_context(device)
        return lambda h, w: FloatPasses(context, self.M, h, w, device)


def _bias_only(b: Tensor | None, x: Tensor) -> Tensor:
    """A layer with no input channels (the first slice's, before anything is decoded): its bias."""
    assert b is not None
    return b[None, :, None, None].expand(x.shape[0], -1, x.shape[2], x.shape[3]).clone()


def grid_residual(y_hat: Any, hyper_means: Any) -> Any:
    """The context's input: ``y_hat - hyper_mean`` on the activation grid (exact).

    Takes tensors or numpy arrays (the same IEEE operations: round half to even, so the same values).
    """
    if isinstance(y_hat, np.ndarray):
        scale = float(2**ACT_BITS)
        return np.clip(np.round((y_hat - hyper_means) * scale) / scale, -_A_MAX, _A_MAX)
    return _to_grid(y_hat - hyper_means, ACT_BITS, _A_MAX)


def hyper_mean_clamped(means: Tensor) -> Tensor:
    """The hyper means as the context adds to them (clamped so every sum is exact)."""
    return means.clamp(-CORRECTION_MAX, CORRECTION_MAX)


# -- the coder's per-pass book-keeping, compiled ---------------------------------------------------
# Numba twins of the numpy arithmetic above (``scale_indexes``, ``grid_residual``): the same IEEE
# operations in the same order, so the same values (tested); one call per pass instead of ten
# numpy operations on fancy-indexed copies.


@numba.njit(cache=False, nogil=True, inline="always")
def _scale_index(log_scale: float) -> Any:  # pragma: no cover - compiled
    """``scale_indexes`` of one log-scale (as a float: the caller's array sets the type)."""
    v = np.ceil((log_scale - SCALE_LOG_MIN) * (1.0 / SCALE_LOG_STEP))
    return min(max(v, 0.0), float(SCALE_LEVELS - 1))


@numba.njit(cache=False, nogil=True, inline="always")
def _residual(y: float, hyper_mean: float) -> Any:  # pragma: no cover - compiled
    """``grid_residual`` of one decoded latent about its hyper mean."""
    scale = float(2**ACT_BITS)
    r = np.rint((y - hyper_mean) * scale) / scale
    return min(max(r, -_A_MAX), _A_MAX)


@numba.njit(cache=False, nogil=True)
def pass_gaussians(
    means: Any, log_scales: Any, d_mean: Any, d_log: Any, lo: int, pos: Any, mu: Any, indexes: Any
) -> None:  # pragma: no cover - compiled
    """Channels ``lo..lo+C`` at flat positions ``pos``: means (hyper mean + correction) into ``mu``
    and scale indexes into ``indexes`` (``C x len(pos)``); ``means``, ``log_scales``: ``M x P``,
    ``d_mean``, ``d_log``: ``C x P``."""
    for c in range(mu.shape[0]):
        for t in range(mu.shape[1]):
            p = pos[t]
            mu[c, t] = means[lo + c, p] + d_mean[c, p]
            indexes[c, t] = _scale_index(log_scales[lo + c, p] + d_log[c, p])


@numba.njit(cache=False, nogil=True)
def pass_update(
    symbols: Any, mu: Any, means: Any, lo: int, pos: Any, y_hat: Any, residual: Any
) -> None:  # pragma: no cover - compiled
    """Record a pass's decoded latents (``symbols + mu``) in ``y_hat`` and their grid residuals
    about the hyper means in ``residual`` (both ``M x P``); ``symbols``: flat int32, ``C x len(pos)``."""
    n = mu.shape[1]
    for c in range(mu.shape[0]):
        for t in range(n):
            p = pos[t]
            yk = symbols[c * n + t] + mu[c, t]
            y_hat[lo + c, p] = yk
            residual[lo + c, p] = _residual(yk, means[lo + c, p])


def warm_up() -> None:
    """Compile the book-keeping kernels now rather than in the first request."""
    grid = np.zeros((1, 2))
    pos = np.arange(2)
    mu, indexes = np.empty((1, 2)), np.empty((1, 2), dtype=np.int32)
    pass_gaussians(grid, grid, grid, grid, 0, pos, mu, indexes)
    pass_update(np.zeros(2, dtype=np.int32), mu, grid, 0, pos, grid.copy(), grid.copy())


# -- a latent's passes, as the entropy coder walks them ---------------------------------------------
#
# The coder (``neural.py``) asks a ``Passes`` object, pass by pass, for the Gaussians of the symbols
# that pass codes, then hands back the symbols.  ``means`` and ``log_scales`` are the hyper-synthesis's
# (``M x h*w`` float64, means clamped by ``hyper_mean_clamped``); ``pos`` the pass's flat positions.


class Passes(Protocol):
    """One latent's context state between passes."""

    def gaussians(
        self, k: int, lo: int, hi: int, where: bool | None, pos: Any, means: Any, log_scales: Any, mu: Any, indexes: Any
    ) -> None:
        """Slice ``k``'s (channels ``lo..hi``) means into ``mu`` and scale indexes into ``indexes``
        (``(hi - lo) x len(pos)``) at positions ``pos``: the hyper-synthesis's plus the context's
        correction from everything decoded so far."""

    def update(self, symbols: Any, mu: Any, means: Any, lo: int, pos: Any, y_hat: Any) -> None:
        """Record a pass's decoded latents (flat int32 ``symbols`` + ``mu``) in ``y_hat`` (``M x h*w``)
        and in what later passes' context reads.  Called after :meth:`gaussians` of the same pass."""


class FloatPasses:
    """Any device, any exact context (``exact_context``): residuals kept as float64 on the
    activation grid, the context network run at every position of each pass."""

    def __init__(
        self,
        context: Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor]],
        m: int,
        h: int,
        w: int,
        device: torch.device,
    ) -> None:
        self.context, self.h, self.w, self.device = context, h, w, device
        self.residual = np.zeros((m, h * w))  # zero until decoded: what the context may read

    def gaussians(
        self, k: int, lo: int, hi: int, where: bool | None, pos: Any, means: Any, log_scales: Any, mu: Any, indexes: Any
    ) -> None:
        shape = (self.h, self.w)
        own = None
        if where is False:
            own = torch.from_numpy(self.residual[lo:hi]).reshape(1, hi - lo, *shape).to(self.device)
        prev = torch.from_numpy(self.residual[:lo]).reshape(1, lo, *shape).to(self.device)
        d_mean, d_log = (
            np.ascontiguousarray(t[0].reshape(hi - lo, -1).cpu().numpy()) for t in self.context(k, prev, own)
        )
        pass_gaussians(means, log_scales, d_mean, d_log, lo, pos, mu, indexes)

    def update(self, symbols: Any, mu: Any, means: Any, lo: int, pos: Any, y_hat: Any) -> None:
        pass_update(symbols, mu, means, lo, pos, y_hat, self.residual)


class Int8Shared:
    """What a coder's :class:`Int8Passes` share from latent to latent: the context's layers
    (``_int8_context_layers``), their biases and multipliers as numpy arrays, each kind of pass's
    rows in the padded planes (per latent size) and each slice's sums before anything is decoded
    (the same for every latent; read-only).  Entries are only ever added, whole."""

    def __init__(self, layers: dict[int, tuple[QConv, QConv, QConv]]) -> None:
        self.layers = layers
        self.arrays = {
            k: (first.bias.numpy(), first.mult.numpy(), out.bias.numpy(), out.mult.numpy())
            for k, (_, first, out) in layers.items()
        }
        self.rows: dict[tuple[int, int, bool | None], tuple[Any, Any]] = {}
        self.constant: dict[tuple[int, int], Any] = {}


class Int8Passes:
    """The int8 context on CPU, fused: the same integers as :class:`FloatPasses` over the int8
    context (tested bit-equal), with less work.

    * The residuals live as the int8 halves of their int16 latent-grid values, padded
      (``2 x (h+2)(w+2) x M``), written by :func:`_update_q8` as each pass decodes: the form the
      context's first layer multiplies, so no pass converts them again.
    * A pass's context runs only at the positions it codes (half of them in a checkerboard
      pass): :func:`_window_q8` gathers those rows of the 3x3 window.
    * The second layer's int32 sums go straight to means and scale indexes
      (:func:`_gaussians_q8`), with no float64 correction maps in between.
    """

    def __init__(self, shared: Int8Shared, bounds: list[int], h: int, w: int) -> None:
        self.h, self.w, self._shared = h, w, shared
        self.planes = np.zeros((2, (h + 2) * (w + 2), bounds[-1]), np.int8)  # rows of the padded h+2 x w+2
        self._at: Any = None

    def _at_rows(self, where: bool | None, pos: Any) -> Any:
        """A pass's positions -> their rows in the padded planes; cached per latent size and kind of
        pass for the coder's own (cached) position arrays, computed afresh for any others."""
        key = (self.h, self.w, where)
        cached = self._shared.rows.get(key)
        if cached is not None and cached[0] is pos:
            return cached[1]
        at = (pos // self.w + 1) * (self.w + 2) + pos % self.w + 1
        self._shared.rows[key] = (pos, at)
        return at

    def gaussians(
        self, k: int, lo: int, hi: int, where: bool | None, pos: Any, means: Any, log_scales: Any, mu: Any, indexes: Any
    ) -> None:
        from .int8 import _hidden, _mm

        c = hi - lo
        self._at = self._at_rows(where, pos)  # update() writes the same pass's positions
        if not len(pos):  # a 1x1 latent's second checkerboard pass
            return
        if k not in self._shared.layers:  # no context: the hyper-synthesis's Gaussians
            zero = np.zeros((c, means.shape[1]))
            pass_gaussians(means, log_scales, zero, zero, lo, pos, mu, indexes)
            return
        only_prev, both, out = self._shared.layers[k]
        first, c_in = (both, hi) if where is False else (only_prev, lo)
        bias_in, mult_in, bias_out, mult_out = self._shared.arrays[k]
        key = (k, len(pos))
        acc = self._shared.constant.get(key) if not c_in else None
        if acc is None:
            width = first.w.shape[1]
            if c_in:
                rows = np.empty((2, len(pos), 9 * c_in), np.int8)
                _window_q8(self.planes, c_in, self._at, self.w, rows)
                acc = _mm(torch.from_numpy(rows.reshape(2 * len(pos), -1)), first.w).numpy()
            else:  # nothing decoded yet: the layer is its bias
                acc = np.zeros((2 * len(pos), width), np.int32)
            hidden = np.empty((len(pos), width), np.int8)
            _hidden(acc, bias_in, mult_in, hidden)
            # The second layer's sums channel-major (its weights times the hidden layer, transposed),
            # so that _gaussians_q8 reads each channel's contiguously.
            acc = _mm(out.w_t, torch.from_numpy(hidden).T).numpy()
            if not c_in:  # the same sums for every latent: kept (read-only) for the next one
                acc.flags.writeable = False
                self._shared.constant[key] = acc
        _gaussians_q8(acc, bias_out, mult_out, means, log_scales, lo, pos, where is None, mu, indexes)

    def update(self, symbols: Any, mu: Any, means: Any, lo: int, pos: Any, y_hat: Any) -> None:
        _update_q8(symbols, mu, means, lo, pos, self._at, y_hat, self.planes)

    @staticmethod
    def warm_up() -> None:
        """Compile the kernels now rather than in the first request."""
        planes = np.zeros((2, 9, 1), np.int8)
        pos, at = np.zeros(1, np.int64), np.full(1, 4, np.int64)
        rows = np.empty((2, 1, 9), np.int8)
        _window_q8(planes, 1, at, 1, rows)
        acc, vec = np.zeros((2, 1), np.int32), np.zeros(2, np.int64)
        grid, mu, indexes = np.zeros((1, 1)), np.empty((1, 1)), np.empty((1, 1), np.int32)
        _gaussians_q8(acc, vec, vec, grid, grid, 0, pos, False, mu, indexes)
        acc.flags.writeable = False  # as the cached sums of a slice with nothing decoded are
        _gaussians_q8(acc, vec, vec, grid, grid, 0, pos, False, mu, indexes)
        _update_q8(np.zeros(1, np.int32), mu, grid, 0, pos, at, grid.copy(), planes)


@numba.njit(cache=False, nogil=True)
def _window_q8(planes: Any, c_in: int, at: Any, w: int, rows: Any) -> None:  # pragma: no cover - compiled
    """The 3x3 window rows (kernel row, kernel column, channel) of channels ``0..c_in`` of the padded
    ``planes`` (``2 x (h+2)(w+2) x M``) about rows ``at``, into ``rows``: ``2 x len(at) x 9c_in``."""
    for half in range(2):
        for t in range(at.shape[0]):
            col = 0
            for di in range(3):
                for dj in range(3):
                    src = planes[half, at[t] + (di - 1) * (w + 2) + dj - 1]
                    for ch in range(c_in):
                        rows[half, t, col + ch] = src[ch]
                    col += c_in


@numba.njit(cache=False, nogil=True)
def _gaussians_q8(
    acc: Any, bias: Any, mult: Any, means: Any, log_scales: Any, lo: int, pos: Any, every: bool, mu: Any, indexes: Any
) -> None:  # pragma: no cover - compiled
    """``pass_gaussians`` from the context's last int32 sums (``2C x len(pos)``: mean corrections,
    then log-scale corrections), rescaled and clamped as ``int8._values`` does.  ``every``: ``pos``
    is every position in order, so the loop reads and writes contiguously (and vectorizes: a third
    of the time of the gather on the widest slice's pass)."""
    c_out = mu.shape[0]
    for c in range(c_out):
        b_mean, m_mean, b_log, m_log = bias[c], mult[c], bias[c_out + c], mult[c_out + c]
        d_means, d_logs, hyper_means, hyper_logs = acc[c], acc[c_out + c], means[lo + c], log_scales[lo + c]
        mu_c, indexes_c = mu[c], indexes[c]
        if every:
            for t in range(mu_c.shape[0]):
                mu_c[t] = hyper_means[t] + _value(d_means[t], b_mean, m_mean, CORRECTION_MAX)
                indexes_c[t] = _scale_index(hyper_logs[t] + _value(d_logs[t], b_log, m_log, CORRECTION_MAX))
        else:
            for t in range(mu_c.shape[0]):
                p = pos[t]
                mu_c[t] = hyper_means[p] + _value(d_means[t], b_mean, m_mean, CORRECTION_MAX)
                indexes_c[t] = _scale_index(hyper_logs[p] + _value(d_logs[t], b_log, m_log, CORRECTION_MAX))


@numba.njit(cache=False, nogil=True)
def _update_q8(
    symbols: Any, mu: Any, means: Any, lo: int, pos: Any, at: Any, y_hat: Any, planes: Any
) -> None:  # pragma: no cover - compiled
    """``pass_update``, with each residual stored as ``int8._latent_planes`` stores it: rounded to the
    int16 latent grid, as two int8 halves, at row ``at[t]`` of the padded ``planes`` (``2 x rows x M``)."""
    n = mu.shape[1]
    for c in range(mu.shape[0]):
        for t in range(n):
            p = pos[t]
            yk = symbols[c * n + t] + mu[c, t]
            y_hat[lo + c, p] = yk
            hi, low = _latent_halves(_residual(yk, means[lo + c, p]))
            planes[0, at[t], lo + c] = hi
            planes[1, at[t], lo + c] = low

"""Noise processes on continuous time ``t in [0, 1]`` (0 = data, 1 = the noisiest level) and every
conversion between prediction types.

Both schedules write a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * eps``:

* :class:`VPSchedule` -- variance preserving, built from a diffusers scheduler's ``alphas_cumprod``
  (DDPM / SD1.5 / SD2.1 / SDXL). Its ``N`` training timesteps ``k = 0 .. N-1`` sit at
  ``t = (k + 1) / N``; ``t = 0`` is the clean image (``alpha = 1``, ``sigma = 0``), which is where
  diffusers' DDIM lands when ``set_alpha_to_one=True``. Between grid points ``log alpha_bar`` is
  interpolated linearly, so any ``t`` is valid; on grid points the values are diffusers' exactly.
* :class:`FlowSchedule` -- rectified flow (SD3 / FLUX): ``alpha = 1 - t``, ``sigma = t``; an optional
  ``shift`` warps the sampling grid and training-time distribution as SD3 does.

Each schedule also numbers a training grid, ``index_time(k)`` / ``time_index(t)`` for ``k = 0 .. N-1``
(the grid the consistency objectives step on): on VP the diffusers timesteps, ``t = (k + 1) / N``; on flow
the training sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler``, ``t = shift_t((k + 1) / N)``.

Prediction types (our names; diffusers' names are translated in ``pipeline.py``):

* ``x0``: the clean sample; ``eps``: the noise;
* ``v``: ``alpha * eps - sigma * x0`` (Salimans & Ho 2022), diffusers' ``v_prediction``;
* ``flow``: ``eps - x0``, the rectified-flow velocity ``d x_t / d t`` of the linear path.

:func:`convert` routes every conversion through the pair ``(x0, eps)``. Two routes divide by a
coefficient that can vanish: ``eps -> x0`` divides by ``alpha`` (zero at ``t = 1`` under the flow
schedule) and ``x0 -> eps`` divides by ``sigma`` (zero at ``t = 0``). There the divisor is clamped to
``MIN_COEF``: the result stays finite (never inf or nan) but carries no information, which is the
honest answer -- noise alone does not determine the image. ``v`` and ``flow`` are well conditioned
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PREDICTION_TYPES = ("x0", "eps", "v", "flow")
MIN_COEF = 1e-6
_SNAP = 1e-3  # a timestep index within this of an integer is taken as that integer


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a float64 tensor on ``like``'s device."""
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient (scalar or ``(B,)``) shaped to multiply ``x`` ``(B, ...)``."""
    coef = coef.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t has shape {tuple(coef.shape)}; expected a scalar or ({x.shape[0]},) for x of shape "
                         f"{tuple(x.shape)}")
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


class Schedule:
    """What both noise processes share: noising, conversions, time sampling."""

    num_train_timesteps: int

    def training_time(self, u) -> torch.Tensor:
        """The noise level of a uniform draw ``u`` on the grid the teacher was trained on: ``u`` itself for VP
        schedules (uniform timesteps); :class:`FlowSchedule` shifts it."""
        return _as_time(u)

    def training_draw(self, t) -> torch.Tensor:
        """The inverse of :meth:`training_time`: the uniform draw whose noise level is ``t``."""
        return _as_time(t)

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def to_timestep(self, t) -> torch.Tensor:
        raise NotImplementedError

    def from_timestep(self, k) -> torch.Tensor:
        raise NotImplementedError

    def index_time(self, k) -> torch.Tensor:
        """The time ``t`` of training-grid index ``k`` (``0 .. N-1``; ``N - 1`` is ``t = 1``): the grid the
        consistency objectives' solver steps on. Index ``-1`` is ``t = 0``."""
        raise NotImplementedError

    def time_index(self, t) -> torch.Tensor:
        """The inverse of :meth:`index_time`: the (possibly fractional) training-grid index of ``t``; integers
        on the grid."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps``; ``t`` a scalar or one value per sample."""
        t = _as_time(t, x0)
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def transition(self, x_s: torch.Tensor, s, t, eps: torch.Tensor) -> torch.Tensor:
        """``x_s`` at time ``s`` moved forward to ``t >= s`` by the noise process itself:
        ``(alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) eps`` (scalars or one value per
        sample): a sample of ``x_s``'s marginal becomes one of ``x_t``'s (VP: ``sqrt(abar_t / abar_s)`` and
        ``sqrt(1 - abar_t / abar_s)``)."""
        s, t = _as_time(s, x_s), _as_time(t, x_s)
        ratio = self.alpha(t) / self.alpha(s)
        std = (self.sigma(t) ** 2 - (ratio * self.sigma(s)) ** 2).clamp_min(0).sqrt()
        return _bcast(ratio, x_s) * x_s + _bcast(std, x_s) * eps

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """Convert a prediction of type ``src`` at ``(x_t, t)`` into type ``dst``."""
        return convert(pred, x_t, t, src, dst, self)

    def sample_t(self, n: int, kind: str = "uniform", *, generator=None, device=None,
                 t_min: float = 0.0, t_max: float = 1.0, mean: float = 0.0, std: float = 1.0,
                 grid: Sequence[float] | None = None) -> torch.Tensor:
        """Draw ``n`` training times (float32, shape ``(n,)``).

        ``kind``: ``"uniform"`` on ``[t_min, t_max]``; ``"logit_normal"`` (SD3: ``sigmoid(N(mean, std))``
        mapped into ``[t_min, t_max]``); ``"discrete"``: uniformly from ``grid`` (default: the
        schedule's own training timesteps).
        """
        if n <= 0:
            raise ValueError(f"sample_t: n must be positive, got {n}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"sample_t: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if kind == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        elif kind == "logit_normal":
            u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
        elif kind == "discrete":
            values = torch.as_tensor(grid if grid is not None else self.train_grid(), dtype=torch.float32)
            idx = torch.randint(len(values), (n,), generator=generator, device=device)
            return values.to(idx.device)[idx]
        else:
            raise ValueError(f"sample_t: unknown kind {kind!r}; choose uniform, logit_normal or discrete")
        return t_min + (t_max - t_min) * u

    def train_grid(self) -> torch.Tensor:
        """The continuous times of the ``num_train_timesteps`` training timesteps, ascending."""
        return self.from_timestep(torch.arange(self.num_train_timesteps, dtype=torch.float64))


class VPSchedule(Schedule):
    """Variance-preserving schedule from a table of ``alphas_cumprod`` (diffusers' ``alpha_bar``)."""

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float]):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.numel() < 2 or not torch.all((ab > 0) & (ab <= 1)):
            raise ValueError("VPSchedule: alphas_cumprod must hold at least 2 values in (0, 1]")
        if torch.any(ab[1:] > ab[:-1]):
            raise ValueError("VPSchedule: alphas_cumprod must be non-increasing")
        self.num_train_timesteps = int(ab.numel())
        self.alphas_cumprod = ab
        # log alpha_bar at t = 0 (clean, alpha_bar = 1) then at t = (k + 1) / N for k = 0 .. N-1
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ab.log()])

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """From a diffusers scheduler object (anything with ``alphas_cumprod``) or its config dict."""
        if hasattr(scheduler, "alphas_cumprod"):
            return cls(scheduler.alphas_cumprod)
        from diffusers import DDPMScheduler

        config = dict(scheduler)
        return cls(DDPMScheduler.from_config(config).alphas_cumprod)

    def _log_alpha_bar(self, t) -> torch.Tensor:
        t = _as_time(t)
        if not t.is_meta and torch.any((t < 0) | (t > 1)):  # meta: shapes only (diffdistill plan)
            raise ValueError(f"VPSchedule: t must lie in [0, 1], got min {t.min().item()}, max {t.max().item()}")
        pos = _snap(t * self.num_train_timesteps)  # position in _log_ab
        table = self._log_ab.to(pos.device)
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1).long()
        frac = pos - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha(self, t) -> torch.Tensor:
        return (0.5 * self._log_alpha_bar(t)).exp()

    def sigma(self, t) -> torch.Tensor:
        return (-torch.expm1(self._log_alpha_bar(t))).clamp_min(0).sqrt()

    def to_timestep(self, t) -> torch.Tensor:
        """The (possibly fractional) diffusers timestep ``k = N t - 1`` of ``t``; integers on the grid."""
        return _snap(_as_time(t) * self.num_train_timesteps) - 1

    def from_timestep(self, k) -> torch.Tensor:
        return (_as_time(k) + 1) / self.num_train_timesteps

    def index_time(self, k) -> torch.Tensor:
        """Index ``k`` is diffusers timestep ``k``: :meth:`from_timestep`."""
        return self.from_timestep(k)

    def time_index(self, t) -> torch.Tensor:
        """:meth:`to_timestep`: the diffusers timestep of ``t``."""
        return self.to_timestep(t)

    def grid(self, n: int, spacing: str = "trailing", steps_offset: int = 0, final: str = "clean") -> torch.Tensor:
        """``n + 1`` decreasing times for an ``n``-step sampler, as diffusers' DDIM would place them.

        ``spacing`` follows diffusers' ``timestep_spacing`` (``leading`` | ``trailing`` | ``linspace``);
        the last entry is where the last step lands: ``final="clean"`` gives ``t = 0``
        (``set_alpha_to_one=True``), ``final="first"`` the first training timestep ``k = 0``.
        """
        N = self.num_train_timesteps
        if not 1 <= n <= N:
            raise ValueError(f"grid: number of steps must be in [1, {N}], got {n}")
        if spacing == "leading":
            ks = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (N // n) + steps_offset
        elif spacing == "trailing":
            ks = torch.round(torch.arange(N, 0, -N / n, dtype=torch.float64)) - 1
        elif spacing == "linspace":
            ks = torch.linspace(0, N - 1, n, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"grid: unknown spacing {spacing!r}; choose leading, trailing or linspace")
        if final not in ("clean", "first"):
            raise ValueError(f"grid: final must be 'clean' or 'first', got {final!r}")
        end = torch.zeros(1, dtype=torch.float64) if final == "clean" else self.from_timestep(torch.zeros(1))
        return torch.cat([self.from_timestep(ks), end])


class FlowSchedule(Schedule):
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` (SD3, FLUX); ``shift`` as in SD3 (3.0 for SD3)."""

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"FlowSchedule: shift must be positive, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)

    def alpha(self, t) -> torch.Tensor:
        return 1 - _check_unit(_as_time(t))

    def sigma(self, t) -> torch.Tensor:
        return _check_unit(_as_time(t))

    def to_timestep(self, t) -> torch.Tensor:
        """The transformer's timestep input: ``t * num_train_timesteps`` (diffusers' flow convention)."""
        return _as_time(t) * self.num_train_timesteps

    def from_timestep(self, k) -> torch.Tensor:
        return _as_time(k) / self.num_train_timesteps

    def shift_t(self, t) -> torch.Tensor:
        """SD3's resolution shift: ``shift * t / (1 + (shift - 1) * t)``."""
        t = _as_time(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def training_time(self, u) -> torch.Tensor:
        """``shift_t(u)``: a flow teacher's training sigmas are its uniform ones shifted (SD3: shift 3)."""
        return self.shift_t(u)

    def training_draw(self, t) -> torch.Tensor:
        return self.unshift_t(t)

    def unshift_t(self, t) -> torch.Tensor:
        """The inverse of :meth:`shift_t`: ``t / (shift - (shift - 1) * t)``."""
        t = _as_time(t)
        return t / (self.shift - (self.shift - 1) * t)

    def index_time(self, k) -> torch.Tensor:
        """``shift_t((k + 1) / N)``: index ``k`` is the ``k``-th of the ``N`` training sigmas of diffusers'
        ``FlowMatchEulerDiscreteScheduler(shift=shift)`` in ascending order (its ``sigmas`` run from index
        ``N - 1``, ``t = 1`` exactly, down to index 0, ``t = shift_t(1 / N)``). For a dynamically shifting
        scheduler (FLUX) ``shift`` is the one fixed at the teacher's size, where that scheduler's own training
        sigmas are unshifted."""
        u = (_as_time(k) + 1) / self.num_train_timesteps
        return torch.where(u == 1, torch.ones_like(u), self.shift_t(u))

    def time_index(self, t) -> torch.Tensor:
        """``N unshift_t(t) - 1``, snapped to the nearest integer within 1e-3 (as :meth:`VPSchedule.to_timestep`)."""
        return _snap(self.unshift_t(_check_unit(_as_time(t))) * self.num_train_timesteps) - 1

    def sample_t(self, n: int, kind: str = "logit_normal", **kwargs) -> torch.Tensor:
        """As :meth:`Schedule.sample_t` (default logit-normal, as SD3), then shifted."""
        return self.shift_t(super().sample_t(n, kind, **kwargs)).float()

    def grid(self, n: int, t_min: float | None = None) -> torch.Tensor:
        """``n + 1`` decreasing times ending at 0: ``linspace(1, t_min, n)`` then shifted, as diffusers'
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (whose ``t_min`` is its ``sigma_min``)."""
        if n < 1:
            raise ValueError(f"grid: number of steps must be >= 1, got {n}")
        if t_min is None:
            t_min = self.shift_t(1.0 / self.num_train_timesteps).item()
        ts = self.shift_t(torch.linspace(1.0, t_min, n, dtype=torch.float64))
        return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


def _snap(pos: torch.Tensor) -> torch.Tensor:
    near = torch.round(pos)
    return torch.where((pos - near).abs() < _SNAP, near, pos)


def _check_unit(t: torch.Tensor) -> torch.Tensor:
    if not t.is_meta and torch.any((t < 0) | (t > 1)):  # meta: shapes only
        raise ValueError(f"FlowSchedule: t must lie in [0, 1], got min {t.min().item()}, max {t.max().item()}")
    return t


def to_x0_eps(pred: torch.Tensor, x_t: torch.Tensor, t, kind: str, schedule: Schedule):
    """The pair ``(x0, eps)`` implied by a prediction of type ``kind`` at ``(x_t, t)``."""
    t = _as_time(t, x_t)
    a, s = _bcast(schedule.alpha(t), x_t), _bcast(schedule.sigma(t), x_t)
    if kind == "x0":
        return pred, (x_t - a * pred) / s.clamp_min(MIN_COEF)
    if kind == "eps":
        return (x_t - s * pred) / a.clamp_min(MIN_COEF), pred
    if kind == "v":  # v = a eps - s x0  and  x_t = a x0 + s eps
        norm = a * a + s * s
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    if kind == "flow":  # u = eps - x0  =>  x_t = (a + s) x0 + s u
        x0 = (x_t - s * pred) / (a + s)
        return x0, pred + x0
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, t, kind: str, schedule: Schedule) -> torch.Tensor:
    """The prediction of type ``kind`` that the pair ``(x0, eps)`` corresponds to at time ``t``."""
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "flow":
        return eps - x0
    if kind == "v":
        t = _as_time(t, x0)
        return _bcast(schedule.alpha(t), x0) * eps - _bcast(schedule.sigma(t), x0) * x0
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def convert(pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str, schedule: Schedule) -> torch.Tensor:
    """Convert ``pred`` (type ``src``) at ``(x_t, t)`` into type ``dst``, routed through ``(x0, eps)``."""
    for kind in (src, dst):
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, x_t, t, src, schedule)
    return from_x0_eps(x0, eps, t, dst, schedule)


__all__ = [
    "MIN_COEF",
    "PREDICTION_TYPES",
    "FlowSchedule",
    "Schedule",
    "VPSchedule",
    "convert",
    "from_x0_eps",
    "to_x0_eps",
]

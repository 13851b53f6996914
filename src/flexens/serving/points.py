"""Which thresholds a request is served at: the server's default, its own ask, or SLO mode's.

Every point comes from :func:`flexens.inference.operating_point`, the function
``infer.py infer.operating_point.*`` uses, so ``?max_drop=0.02`` on the server and
``infer.operating_point.max_drop=0.02`` halt at the same thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexens.calibration.schema import Calibration
from flexens.inference import OperatingPointRequest, operating_point

SETTINGS = ("max_drop", "budget_ms", "lam")
"""What a request may ask for: the certified front (``max_drop``) or the Pareto front."""

CACHE_SIZE = 256
"""Distinct asked-for points remembered per server process (the lookup is cheap anyway)."""


class RequestRejected(ValueError):
    """A request the server refuses: ``status`` is its 4xx, the message its one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ServedPoint:
    """An operating point as served: thresholds (``None`` for the full ensemble) and facts."""

    name: str
    thresholds: tuple[float, ...] | None
    expected_ms: float
    certified: bool
    loss_bound: float | None
    """Certified accuracy-loss bound (ε), or ``None`` when uncertified."""
    observed_loss: float | None
    """Calibration-split accuracy loss against the full ensemble."""

    def describe(self) -> str:
        """One line: what this point costs and what it may lose."""
        line = f"{self.name}: {self.expected_ms:.3g} ms/image expected"
        if self.thresholds is None:
            return line + ", every member"
        if self.certified:
            return line + f", certified accuracy loss <= {self.loss_bound * 100:.2f} pp"
        observed = self.observed_loss or 0.0
        return line + f", not certified (calibration loss {observed * 100:.2f} pp, an estimate)"


def _served(name: str, thresholds, expected_ms: float, certificate: dict | None) -> ServedPoint:
    certificate = certificate or {}
    certified = bool(certificate.get("certified"))
    return ServedPoint(
        name=name,
        thresholds=tuple(float(t) for t in thresholds),
        expected_ms=float(expected_ms),
        certified=certified,
        loss_bound=certificate.get("epsilon") if certified else None,
        observed_loss=certificate.get("observed_risk"),
    )


class ServingFront:
    """The points this server offers: a default, the limits on asks, and the SLO ladder.

    ``limits`` maps each of :data:`SETTINGS` to ``(min, max)`` or ``None`` (not offered).
    With ``full=True`` every request runs every member and no point may be asked for.
    """

    def __init__(
        self,
        calibration: Calibration,
        limits: dict[str, tuple[float, float] | None],
        default: tuple[str, float] | None = None,
        full: bool = False,
    ) -> None:
        self.calibration = calibration
        self.limits = limits
        self.full = full
        self._cache: dict[tuple[str, float], ServedPoint] = {}
        if full:
            latency = calibration.full.expected_latency_ms
            self.default = ServedPoint("full", None, latency, False, None, 0.0)
        else:
            setting, value = default if default is not None else (None, None)
            self.default = self._choose(setting, value)

    def _choose(self, setting: str | None, value: float | None) -> ServedPoint:
        request = OperatingPointRequest(**({setting: value} if setting else {}))
        point = operating_point(request, self.calibration)
        return _served(point.name, point.thresholds, point.expected_latency_ms, point.certificate)

    def resolve(self, asked: dict[str, str]) -> ServedPoint | None:
        """The point a request asks for (``None``: it asked for none), or a 4xx."""
        if not asked:
            return None
        if len(asked) > 1:
            raise RequestRejected(422, f"ask for one operating point, got {sorted(asked)}")
        ((setting, text),) = asked.items()
        if self.full:
            raise RequestRejected(
                422, f"this server runs the full ensemble (serve.mode=full); drop {setting}"
            )
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise RequestRejected(
                422, f"{setting} must be a number, got {str(text)[:40]!r}"
            ) from None
        bounds = self.limits.get(setting)
        if bounds is None:
            raise RequestRejected(422, f"this server does not offer {setting} operating points")
        low, high = bounds
        if not (math.isfinite(value) and low <= value <= high):
            raise RequestRejected(
                422, f"{setting}={value:g} is outside what this server allows, [{low:g}, {high:g}]"
            )
        key = (setting, value)
        if key not in self._cache:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            try:
                self._cache[key] = self._choose(setting, value)
            except ValueError as error:
                raise RequestRejected(422, " ".join(str(error).split())) from None
        return self._cache[key]

    def ladder(self, max_drops: list[float]) -> list[ServedPoint]:
        """SLO mode's levels: the default, then the certified points at each ``max_drop``
        that is cheaper than the level before it (a looser ε may certify the same point)."""
        if self.full:
            raise ValueError("SLO mode steps between flexible points; it needs serve.mode=flexible")
        levels = [self.default]
        for epsilon in sorted(max_drops):
            point = self._choose("max_drop", float(epsilon))
            if point.expected_ms < levels[-1].expected_ms:
                levels.append(point)
        if len(levels) < 2:
            raise ValueError(
                f"no point of serve.slo.ladder {max_drops} is cheaper than the default "
                f"{self.default.name}; add larger max_drop values"
            )
        return levels

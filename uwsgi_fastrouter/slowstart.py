"""Slow start: a node that (re)joins a key gets its share of requests gradually.

Theory of operation
-------------------
With ``--subscription-slow-start SECS`` (off by default), a subscribed node that joins
a key (a new node, or a dead one announcing again) or comes back up after failed
health checks starts a *ramp*: for SECS seconds its weight is scaled by a factor that
grows linearly from :data:`FLOOR` to 1.  A cold node (empty caches, a fresh process
importing its application) thus takes a trickle of the key's traffic at first, not
its full share at once.

The ramp changes only how the key's algorithm compares the candidates:

``wrr``
    smooth weighted round robin with the scaled weights (fractions are fine: the
    algorithm only adds and compares them), so over a stretch of the ramp the node
    gets about ``weight * factor / total`` of the picks.
``lrc``, ``wlrc``
    the node whose load *after* this pick, ``(ref + 1) / (weight * factor)``, is
    least (``lrc`` counts every weight as 1); ties go to the node with fewer
    recent requests, then to the earlier node.  Counting the pick itself is what
    makes the ramp matter when no node has a request in flight: a ramping node
    is then picked only while the others are busier.
``iphash``
    not ramped: a client's node must not change with time.

Everything here is pure: the time is a parameter (``now``, the same clock as the
node's ``ramp_from``), and the picker only reads and updates the node records it is
given.  The subscription table calls :func:`pick_ramped` only while some node of a
key is ramping, so a key without a ramp pays nothing.
"""

from __future__ import annotations

from typing import Any, List, Optional

__all__ = ["FLOOR", "ramp_factor", "pick_ramped", "still_ramping"]

#: the weight factor at the first moment of a ramp
FLOOR = 0.1


def ramp_factor(ramp_from: float, now: float, duration: float) -> float:
    """The weight factor of a node whose ramp began at *ramp_from* (0: no ramp)."""
    if not ramp_from or duration <= 0:
        return 1.0
    elapsed = now - ramp_from
    if elapsed >= duration:
        return 1.0
    if elapsed <= 0:
        return FLOOR
    return FLOOR + (1.0 - FLOOR) * elapsed / duration


def still_ramping(nodes: List[Any], now: float, duration: float) -> bool:
    """True while a node of *nodes* is inside its ramp; a node whose ramp is over
    gets ``ramp_from`` 0, so the next look is cheap."""
    ramping = False
    for node in nodes:
        if node.ramp_from:
            if now - node.ramp_from >= duration:
                node.ramp_from = 0.0
            else:
                ramping = True
    return ramping


def pick_ramped(nodes: List[Any], algo: str, now: float, duration: float) -> Optional[Any]:
    """Pick among the alive *nodes* (``death_mark`` 0) with ramped weights, for the
    algorithm *algo* (``wrr``, ``lrc`` or ``wlrc``); take a reference on the choice."""
    if algo == "wrr":
        chosen = _pick_wrr(nodes, now, duration)
    else:
        chosen = _pick_least(nodes, algo == "wlrc", now, duration)
    if chosen is not None:
        chosen.ref += 1
    return chosen


def _pick_wrr(nodes: List[Any], now: float, duration: float) -> Optional[Any]:
    best = None
    total = 0.0
    for node in nodes:
        if node.death_mark:
            continue
        weight = node.weight * ramp_factor(node.ramp_from, now, duration)
        total += weight
        node.current += weight
        if best is None or node.current > best.current:
            best = node
    if best is not None:
        best.current -= total
    return best


def _pick_least(nodes: List[Any], weighted: bool, now: float, duration: float) -> Optional[Any]:
    best = None
    best_load = 0.0
    for node in nodes:
        if node.death_mark:
            continue
        capacity = ramp_factor(node.ramp_from, now, duration)
        if weighted:
            capacity *= node.weight
        load = (node.ref + 1) / capacity
        if (best is None or load < best_load
                or (load == best_load and node.last_requests < best.last_requests)):
            best = node
            best_load = load
    return best

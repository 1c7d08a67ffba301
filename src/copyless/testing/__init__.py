"""Helpers shipped with copyless for testing applications built on it."""

from __future__ import annotations

from .faultproxy import FaultProxy, FaultProxyStatistics

__all__ = ["FaultProxy", "FaultProxyStatistics"]

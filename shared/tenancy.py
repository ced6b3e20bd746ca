"""Tenancy as a type: every read of a team's data takes a TeamID, which only caller authentication makes."""

from __future__ import annotations

from typing import NewType

TeamID = NewType("TeamID", str)

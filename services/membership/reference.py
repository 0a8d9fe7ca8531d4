"""Reference data: the digital-economy industry classification and ISO 3166-2 regions.

The taxonomy is data (``data/industries.json``), not code: a firm's industries and a
cluster's focus industries are codes from it, either a category (``"03"``) or one of
its sub-categories (``"0301"``). Regions are ISO 3166-2 subdivision codes from pycountry.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pycountry

_DATA = Path(__file__).parent / "data" / "industries.json"


@cache
def industry_taxonomy() -> dict[str, Any]:
    return json.loads(_DATA.read_text(encoding="utf-8"))


@cache
def industry_codes() -> frozenset[str]:
    codes: set[str] = set()
    for category in industry_taxonomy()["categories"]:
        codes.add(category["code"])
        codes.update(sub["code"] for sub in category["subcategories"])
    return frozenset(codes)


def is_core_industry(code: str) -> bool:
    """Whether a code belongs to the digital core (categories 01 to 04)."""
    return code[:2] in industry_taxonomy()["core_categories"]


def validate_industries(codes: list[str]) -> list[str]:
    """Deduplicated codes in input order; raises ValueError on an unknown code."""
    unknown = [c for c in codes if c not in industry_codes()]
    if unknown:
        raise ValueError(f"unknown industry codes: {', '.join(unknown)}; see /v1/industries")
    return list(dict.fromkeys(codes))


@cache
def _subdivisions() -> dict[str, Any]:
    return {s.code: s for s in pycountry.subdivisions}


def validate_region(code: str) -> str:
    """The canonical ISO 3166-2 code (``CN-BJ``); raises ValueError when unknown."""
    canonical = code.strip().upper()
    if canonical not in _subdivisions():
        raise ValueError(f"{code!r} is not an ISO 3166-2 subdivision code (e.g. CN-BJ)")
    return canonical


def regions(country: str | None = None) -> list[dict[str, str]]:
    out = []
    for sub in _subdivisions().values():
        if country and sub.country_code != country.upper():
            continue
        out.append(
            {
                "code": sub.code,
                "name": sub.name,
                "type": sub.type,
                "country": sub.country_code,
                "parent": sub.parent_code or "",
            }
        )
    out.sort(key=lambda r: r["code"])
    return out

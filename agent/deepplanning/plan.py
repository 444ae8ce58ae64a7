"""The final plan: finding it in the agent's answer and reading it without trusting its shape.

The agent writes its plan as one JSON object inside `<plan>` ... `</plan>` (the tag the official
agent uses; a ```json fence inside the tags is tolerated). The JSON follows the official converted
structure:

    {"budget_summary": {"total_estimated_budget": 6280, ...},
     "daily_plans": [{"day_number": 1, "current_city": "from A to B",
                      "accommodation": {"name": ..., "price_per_night": ...},
                      "activities": [{"time_slot": "HH:MM-HH:MM", "type": ..., "details": {...}}]}]}

Every accessor here returns an empty/neutral value for a part of the wrong type, so the checkers
can run on any JSON the model produced without raising.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

_PLAN_RE = re.compile(r"<plan>(.*?)</plan>", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)

FLIGHT_MODES = ("flight", "飞机", "airplane", "plane")
TRAIN_MODES = ("train", "火车", "railway", "高铁", "gaotie")


def extract_plan(text: Any) -> dict | None:
    """The plan object of an answer: the last `<plan>` block (after any thinking) parsed as a JSON object.

    None when there is no block, the block is not JSON, or the JSON is not an object.
    """
    if not isinstance(text, str):
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    blocks = _PLAN_RE.findall(text)
    if not blocks:
        return None
    body = blocks[-1].strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        plan = json.loads(body)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) else None


def text(value: Any) -> str:
    """A string field stripped ('' for anything that is not a string)."""
    return value.strip() if isinstance(value, str) else ""


def number(value: Any) -> float | None:
    """A cost/price field as a float (numbers and numeric strings; None otherwise)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def days(plan: Any) -> list[dict]:
    """The plan's days (dicts only, in order)."""
    daily = plan.get("daily_plans") if isinstance(plan, dict) else None
    return [d for d in daily if isinstance(d, dict)] if isinstance(daily, list) else []


def activities(day: Any) -> list[dict]:
    """A day's activities (dicts only, in order)."""
    acts = day.get("activities") if isinstance(day, dict) else None
    return [a for a in acts if isinstance(a, dict)] if isinstance(acts, list) else []


def details(act: Any) -> dict:
    """An activity's details object ({} when absent or not an object)."""
    found = act.get("details") if isinstance(act, dict) else None
    return found if isinstance(found, dict) else {}


def acts_of(plan_days: list[dict], kind: str) -> Iterator[tuple[int, dict, dict]]:
    """(day index from 0, activity, details) for every activity of type `kind`."""
    for index, day in enumerate(plan_days):
        for act in activities(day):
            if act.get("type") == kind:
                yield index, act, details(act)


def names_of(plan_days: list[dict], kind: str) -> list[str]:
    """details.name of every activity of type `kind` ('' kept out)."""
    return [n for n in (text(d.get("name")) for _, _, d in acts_of(plan_days, kind)) if n]


def intercity_numbers(plan_days: list[dict], modes: tuple[str, ...]) -> set[str]:
    """Flight or train numbers (details.number) of intercity activities whose mode is in `modes`."""
    found = set()
    for _, _, det in acts_of(plan_days, "travel_intercity_public"):
        if text(det.get("mode")).lower() in modes:
            found.add(text(det.get("number")))
    return found


def hotel_names(plan_days: list[dict]) -> set[str]:
    """accommodation.name of every day that has an accommodation object."""
    names = set()
    for day in plan_days:
        accom = day.get("accommodation")
        if isinstance(accom, dict) and text(accom.get("name")):
            names.add(text(accom.get("name")))
    return names


def slot_minutes(slot: Any) -> tuple[int | None, int | None]:
    """A time_slot "HH:MM-HH:MM" as (start, end) in minutes after midnight; (None, None) if malformed."""
    parts = slot.split("-") if isinstance(slot, str) else []
    if len(parts) != 2:
        return None, None
    start, end = clock_minutes(parts[0]), clock_minutes(parts[1])
    if start is None or end is None:
        return None, None
    return start, end


def clock_minutes(value: Any) -> int | None:
    """"HH:MM" (00:00 to 24:00) in minutes after midnight; None if malformed."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::\d{2})?\s*", value) if isinstance(value, str) else None
    if not match:
        return None
    hours, minutes = int(match.group(1)), int(match.group(2))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        return None
    return hours * 60 + minutes


def from_to(current_city: Any) -> tuple[str | None, str | None]:
    """"from A to B" (or 从A到B) as (A, B); (None, None) for a single city."""
    value = text(current_city)
    match = re.fullmatch(r"from\s+(.+?)\s+to\s+(.+)", value, re.IGNORECASE) or re.fullmatch(r"从(.+?)到(.+)", value)
    if not match:
        return None, None
    return match.group(1).strip(), match.group(2).strip()


def city_key(name: Any) -> str:
    """A city name compared loosely: lower case, no spaces, no trailing 市/'city'."""
    value = text(name).lower().replace(" ", "")
    for suffix in ("市", "city"):
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[: -len(suffix)]
    return value


def plan_cost(plan_days: list[dict], people: int, rooms: int) -> float:
    """The trip's total cost in yuan, by the official budget rule.

    Intercity: the first priced intercity activity of each day (a transfer's segments all show the
    route's price) times people; accommodation: price per night times rooms, every day but the last; meals and
    attraction tickets: cost times people; travel_city: cost per vehicle times ceil(people / 4).
    """
    total = 0.0
    taxis = max(1, (people + 3) // 4)
    for day in plan_days:
        costs = [number(details(a).get("cost")) for a in activities(day) if a.get("type") == "travel_intercity_public"]
        total += next((c for c in costs if c is not None), 0.0) * people
    for day in plan_days[:-1]:
        accom = day.get("accommodation")
        if isinstance(accom, dict):
            price = next((p for p in (number(accom.get(k)) for k in ("price", "price_per_night", "cost")) if p), 0.0)
            total += price * rooms
    for kind, factor in (("meal", people), ("attraction", people), ("travel_city", taxis)):
        for _, _, det in acts_of(plan_days, kind):
            total += (number(det.get("cost")) or 0.0) * factor
    return total

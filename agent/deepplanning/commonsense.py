"""Commonsense checks: the official 8 dimensions (each weighted 1/8, all-or-nothing inside a dimension).

A check returns True/False, or None when it cannot be judged here: the checks that read the task's
database return None without it, and `reasonable_transfer_time` (anchor-to-anchor gaps against the
distance matrix) is not implemented and always None. A dimension is scored over its judged checks
(1.0 when all pass); dimensions with no judged check are left out and the commonsense score is the
mean over the judged ones (the official score sums all 8 dimensions, counting an unjudged one as 0).
"""

from __future__ import annotations

from typing import Callable

from agent.deepplanning import plan as P
from agent.deepplanning.database import TaskDatabase

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "route_consistency": ("valid_trip_duration", "closed_loop_route_structure", "seamless_intercity_transfers"),
    "sandbox_compliance": ("validated_accommodation", "validated_attractions", "validated_meals",
                           "validated_transportation"),
    "itinerary_structure": ("traceable_accommodation", "ends_with_accommodation", "essential_meal_coverage",
                            "essential_attraction_coverage"),
    "time_feasibility": ("no_time_overlaps", "reasonable_transfer_time"),
    "business_hours": ("attraction_visit_within_opening_hours", "dining_within_service_hours",
                       "avoidance_of_closure_days"),
    "duration_rationality": ("reasonable_duration_at_attractions", "reasonable_meal_duration"),
    "cost_calculation_accuracy": ("cost_calculation_correctness",),
    "activity_diversity": ("diverse_meal_options", "diverse_attraction_options"),
}

WEEKDAYS = {1: ("monday", "mon", "周一", "星期一"), 2: ("tuesday", "tue", "周二", "星期二"),
            3: ("wednesday", "wed", "周三", "星期三"), 4: ("thursday", "thu", "周四", "星期四"),
            5: ("friday", "fri", "周五", "星期五"), 6: ("saturday", "sat", "周六", "星期六"),
            7: ("sunday", "sun", "周日", "星期日", "周天", "星期天")}


class _Index:
    """Name -> row lookups over the task database (None when a table is missing)."""

    def __init__(self, db: TaskDatabase | None):
        self.db = db if db is not None and db.exists() else None

    def by(self, table: str, key: str) -> dict | None:
        rows = self.db.rows(table) if self.db else None
        if rows is None:
            return None
        index: dict = {}
        for row in rows:
            index.setdefault(row.get(key, ""), row)
        return index

    def numbers(self) -> dict | None:
        """flight/train number -> every priced row of it (None without both tables)."""
        trains, flights = (self.db.rows(t) if self.db else None for t in ("trains", "flights"))
        if trains is None and flights is None:
            return None
        found: dict = {}
        for row in (flights or ()):
            found.setdefault(row.get("flight_no", ""), []).append(row)
        for row in (trains or ()):
            found.setdefault(row.get("train_no", ""), []).append(row)
        return found

    def station_cities(self) -> dict:
        """station name -> city, from the intercity tables (empty without them)."""
        cities: dict = {}
        for table in ("trains", "flights"):
            for row in (self.db.rows(table) if self.db else None) or ():
                cities.setdefault(row.get("dep_station_name", ""), row.get("origin_city", ""))
                cities.setdefault(row.get("arr_station_name", ""), row.get("destination_city", ""))
        return cities


def evaluate(plan: object, meta: dict, db: TaskDatabase | None = None) -> dict[str, bool | None]:
    """Every commonsense check by its official name: True/False, or None when not judged."""
    days = P.days(plan)
    if not days:
        return {name: (None if name == "reasonable_transfer_time" else False)
                for checks in DIMENSIONS.values() for name in checks}
    index = _Index(db)
    results: dict[str, bool | None] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check(plan, days, meta, index)
        except Exception:  # a malformed plan fails the check, never the scoring
            results[name] = False
    return results


def score(results: dict[str, bool | None]) -> tuple[float, dict[str, float]]:
    """(commonsense score in [0, 1], {dimension: 0/1}) over the judged dimensions."""
    dims: dict[str, float] = {}
    for dim, checks in DIMENSIONS.items():
        judged = [results.get(c) for c in checks if results.get(c) is not None]
        if judged:
            dims[dim] = 1.0 if all(judged) else 0.0
    return (sum(dims.values()) / len(dims) if dims else 0.0), dims


# ---------------------------------------------------------------- route consistency

def valid_trip_duration(plan, days, meta, index) -> bool:
    return len(days) == _int(meta.get("days"), 0) > 0


def closed_loop_route_structure(plan, days, meta, index) -> bool:
    org = P.city_key(meta.get("org"))
    start, _ = P.from_to(days[0].get("current_city"))
    _, end = P.from_to(days[-1].get("current_city"))
    return (not start or P.city_key(start) == org) and (not end or P.city_key(end) == org)


def seamless_intercity_transfers(plan, days, meta, index) -> bool:
    """The city chain org -> ... holds, and each travel day has an intercity ride between its two cities."""
    here = P.city_key(meta.get("org"))
    stations = index.station_cities()
    for day in days:
        start, end = P.from_to(day.get("current_city"))
        if start and end:
            rides = [d for _, _, d in P.acts_of([day], "travel_intercity_public")]
            if P.city_key(start) != here or not any(_ride_links(d, start, end, stations) for d in rides):
                return False
            here = P.city_key(end)
        elif not P.city_key(day.get("current_city")) or P.city_key(day.get("current_city")) != here:
            return False
    return True


def _ride_links(det: dict, start: str, end: str, stations: dict) -> bool:
    """Whether a ride goes from a station of `start` to a station of `end`.

    A station's city comes from the intercity tables when the database is there; otherwise the city
    name must appear in the station name ("Hefei South Station" is in Hefei).
    """
    def in_city(station: str, city: str) -> bool:
        if station in stations:
            return P.city_key(stations[station]) == P.city_key(city)
        return bool(station) and P.city_key(city) in P.city_key(station)

    return in_city(P.text(det.get("from")), start) and in_city(P.text(det.get("to")), end)


# ---------------------------------------------------------------- sandbox compliance

def validated_accommodation(plan, days, meta, index) -> bool | None:
    hotels = index.by("hotels", "name")
    if hotels is None:
        return None
    for i, day in enumerate(days):
        accom = day.get("accommodation")
        name = P.text(accom.get("name")) if isinstance(accom, dict) else ""
        if not name or (i == len(days) - 1 and name == "-"):
            continue
        if name not in hotels:
            return False
        price = next((p for p in (P.number(accom.get(k)) for k in ("price", "cost", "price_per_night")) if p), None)
        if not _same_price(price, hotels[name].get("price")):
            return False
    hotel_acts = [P.text(d.get("name")) for _, _, d in P.acts_of(days[:-1], "hotel")]
    return all(n in hotels for n in hotel_acts if n)


def validated_attractions(plan, days, meta, index) -> bool | None:
    return _priced_names(days, "attraction", index.by("attractions", "attraction_name"), "ticket_price")


def validated_meals(plan, days, meta, index) -> bool | None:
    return _priced_names(days, "meal", index.by("restaurants", "restaurant_name"), "price_per_person")


def _priced_names(days, kind, table, price_key) -> bool | None:
    """Every `kind` activity names a row of `table` and its cost equals that row's price (rounded)."""
    if table is None:
        return None
    for _, _, det in P.acts_of(days, kind):
        name = P.text(det.get("name"))
        if name not in table:
            return False
        if not _same_price(P.number(det.get("cost")), table[name].get(price_key)):
            return False
    return True


def _same_price(plan_price: float | None, db_price: str) -> bool:
    """Equal after rounding; a row without a price accepts anything, a plan without one fails."""
    db_value = P.number(db_price)
    if db_value is None:
        return True
    return plan_price is not None and round(plan_price) == round(db_value)


def validated_transportation(plan, days, meta, index) -> bool | None:
    numbers = index.numbers()
    for _, _, det in P.acts_of(days, "travel_intercity_public"):
        if any(det.get(k) in (None, "") for k in ("number", "from", "to", "cost")):
            return False
        if numbers is None:
            continue
        rows = numbers.get(P.text(det.get("number")))
        if not rows:
            return False
        cost = P.number(det.get("cost"))
        prices = [P.number(r.get("price")) for r in rows if P.number(r.get("price")) is not None]
        if cost is not None and prices and round(cost) not in {round(p) for p in prices}:
            return False
    return None if numbers is None else True


# ---------------------------------------------------------------- itinerary structure

def traceable_accommodation(plan, days, meta, index) -> bool:
    for day in days[:-1]:
        if not day.get("accommodation") or not any(True for _ in P.acts_of([day], "hotel")):
            return False
    last = days[-1].get("accommodation")
    if not last:
        return True
    return isinstance(last, dict) and P.text(last.get("name")) in ("", "-")


def ends_with_accommodation(plan, days, meta, index) -> bool:
    return all(P.activities(d) and P.activities(d)[-1].get("type") == "hotel" for d in days[:-1])


def essential_meal_coverage(plan, days, meta, index) -> bool:
    """Meals per day by the official rule: 2 on a full day; on travel days by departure/arrival hour."""
    for day, leaving, arriving in _travel_days(days, meta):
        meals = sorted(s for s in (P.slot_minutes(a.get("time_slot")) for _, a, _ in P.acts_of([day], "meal"))
                       if s[0] is not None)
        if leaving is None and arriving is None and len(meals) < 2:
            return False
        if leaving is not None and ((leaving < 9 and meals) or (9 <= leaving < 15 and len(meals) > 1)
                                    or (leaving >= 15 and not meals)):
            return False
        if arriving is not None and ((arriving < 10 and len(meals) < 2) or (10 <= arriving < 15 and not meals)
                                     or (arriving >= 15 and len(meals) > 1)):
            return False
        if len(meals) >= 2 and meals[1][0] - meals[0][1] < 120:
            return False
    return True


def essential_attraction_coverage(plan, days, meta, index) -> bool:
    """Sightseeing per day: a full day >= 4 h of attraction time or >= 2 attractions; travel days >= 1 when
    leaving after 16:00 or arriving before 12:00."""
    for day, leaving, arriving in _travel_days(days, meta):
        visits = [a for _, a, _ in P.acts_of([day], "attraction")]
        if leaving is None and arriving is None:
            if len(visits) < 2 and _attraction_minutes(day) < 240:
                return False
        elif not visits and ((leaving is not None and leaving > 16) or (arriving is not None and arriving < 12)):
            return False
    return True


def _attraction_minutes(day: dict) -> int:
    """Minutes spent at attractions plus travel_city legs to or from one."""
    names = set(P.names_of([day], "attraction"))
    total = 0
    for act in P.activities(day):
        det = P.details(act)
        touches = P.text(det.get("from")) in names or P.text(det.get("to")) in names
        if act.get("type") == "attraction" or (act.get("type") == "travel_city" and touches):
            start, end = P.slot_minutes(act.get("time_slot"))
            if start is not None:
                total += (end - start) % 1440
    return total


def _travel_days(days: list[dict], meta: dict):
    """(day, hour leaving a visited city or None, hour arriving at a visited city or None) per day.

    A full day in one city yields (day, None, None); hours are floats (10.5 = 10:30).
    """
    org = P.city_key(meta.get("org"))
    here = org
    for day in days:
        start, end = P.from_to(day.get("current_city"))
        if not (start and end):
            yield day, None, None
            continue
        slots = [P.slot_minutes(a.get("time_slot")) for _, a, _ in P.acts_of([day], "travel_intercity_public")]
        slots = [s for s in slots if s[0] is not None]
        leaving = slots[0][0] / 60 if slots and P.city_key(start) == here and P.city_key(start) != org else None
        arriving = slots[-1][1] / 60 if slots and P.city_key(end) != org else None
        here = P.city_key(end)
        yield day, leaving, arriving


# ---------------------------------------------------------------- time feasibility

def no_time_overlaps(plan, days, meta, index) -> bool:
    for day in days:
        slots = sorted(s for s in (P.slot_minutes(a.get("time_slot")) for a in P.activities(day)) if s[0] is not None)
        if any(later[0] < earlier[1] for earlier, later in zip(slots, slots[1:])):
            return False
    return True


def reasonable_transfer_time(plan, days, meta, index) -> None:
    """Not implemented here (needs coordinates of every anchor and the distance matrix): never judged."""
    return None


# ---------------------------------------------------------------- business hours

def attraction_visit_within_opening_hours(plan, days, meta, index) -> bool | None:
    return _within_hours(days, "attraction", index.by("attractions", "attraction_name"), strict=True)


def dining_within_service_hours(plan, days, meta, index) -> bool | None:
    return _within_hours(days, "meal", index.by("restaurants", "restaurant_name"), strict=False)


def _within_hours(days, kind, table, strict: bool) -> bool | None:
    """Each visit of a known place lies inside its opening_time..closing_time (overnight hours allowed).

    strict: a known place without readable hours fails (attractions); otherwise it is skipped (meals).
    """
    if table is None:
        return None
    for _, act, det in P.acts_of(days, kind):
        row = table.get(P.text(det.get("name")))
        if row is None:
            continue
        opening, closing = P.clock_minutes(row.get("opening_time")), P.clock_minutes(row.get("closing_time"))
        if opening is not None and opening == closing:
            continue  # open all day
        start, end = P.slot_minutes(act.get("time_slot"))
        if start is None:
            return False
        if opening is None or closing is None:
            if strict:
                return False
            continue
        if not _inside(start, end, opening, closing):
            return False
    return True


def _inside(start: int, end: int, opening: int, closing: int) -> bool:
    """Whether [start, end] (minutes) lies within opening hours; closing before opening means past midnight."""
    if closing > opening:
        return opening <= start and end <= closing
    return start >= opening or end <= closing


def avoidance_of_closure_days(plan, days, meta, index) -> bool | None:
    table = index.by("attractions", "attraction_name")
    if table is None:
        return None
    first = _int(meta.get("depart_weekday"), 0)
    if not 1 <= first <= 7:
        return True
    for i, _, det in P.acts_of(days, "attraction"):
        row = table.get(P.text(det.get("name")))
        weekday = (first - 1 + i) % 7 + 1
        if row is not None and _closed_on(row.get("closing_dates", ""), weekday):
            return False
    return True


def _closed_on(closing_dates: str, weekday: int) -> bool:
    """Whether a closing_dates text ("Monday", "周一闭馆", ...) names weekday (1 = Monday)."""
    value = closing_dates.lower()
    words = value.replace(",", " ").replace("，", " ").replace("、", " ").split()
    return any(name in value if not name.isascii() else name in words or name + "s" in words
               for name in WEEKDAYS[weekday])


# ---------------------------------------------------------------- duration rationality

def reasonable_duration_at_attractions(plan, days, meta, index) -> bool | None:
    table = index.by("attractions", "attraction_name")
    if table is None:
        return None
    for _, act, det in P.acts_of(days, "attraction"):
        row = table.get(P.text(det.get("name")))
        if row is None:
            continue
        start, end = P.slot_minutes(act.get("time_slot"))
        low, high = P.number(row.get("min_visit_hours")), P.number(row.get("max_visit_hours"))
        if start is None or end < start or low is None or high is None:
            return False
        if not low <= (end - start) / 60 <= high:
            return False
    return True


def reasonable_meal_duration(plan, days, meta, index) -> bool:
    """Every named meal lasts 30 to 150 minutes."""
    for _, act, det in P.acts_of(days, "meal"):
        if not P.text(det.get("name")):
            continue
        start, end = P.slot_minutes(act.get("time_slot"))
        if start is None or not 30 <= (end - start) % 1440 <= 150:
            return False
    return True


# ---------------------------------------------------------------- cost, diversity

def cost_calculation_correctness(plan, days, meta, index) -> bool:
    """budget_summary.total_estimated_budget within 10 % of the cost recomputed from the days."""
    summary = plan.get("budget_summary") if isinstance(plan, dict) else None
    stated = P.number(summary.get("total_estimated_budget")) if isinstance(summary, dict) else None
    if stated is None:
        return False
    computed = P.plan_cost(days, _int(meta.get("people_number"), 1), _int(meta.get("room_number"), 1))
    if stated == 0:
        return computed == 0
    return abs(computed - stated) / stated <= 0.10


def diverse_meal_options(plan, days, meta, index) -> bool:
    names = P.names_of(days, "meal")
    return len(names) == len(set(names))


def diverse_attraction_options(plan, days, meta, index) -> bool:
    names = P.names_of(days, "attraction")
    return len(names) == len(set(names))


def _int(value: object, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


CHECKS: dict[str, Callable] = {name: globals()[name] for checks in DIMENSIONS.values() for name in checks}

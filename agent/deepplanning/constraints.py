"""Hard (personalised) constraints: one checker per constraint type of the task files.

Each task's `meta_info.hard_constraints` maps a constraint type to its data, which names the
ground-truth entities the plan must contain (as in the official `constraints_hard.py`):

- flight_* / train_*: `outbound_*_no` / `inbound_*_no` must appear as the number of an intercity
  activity of that mode;
- hotel_*: `hotel_name` must be the accommodation of some day;
- restaurant_*: `restaurant_name` must be one of the meals;
- attraction_*: every name in `attraction_names` must be visited;
- budget_constraint: the plan's cost (official budget rule, `plan.plan_cost`) must not exceed
  `max_budget` yuan.

A checker returns (passed, reason); reason is None when it passes.
"""

from __future__ import annotations

from typing import Any, Callable

from agent.deepplanning import plan as P

Result = tuple[bool, "str | None"]
Checker = Callable[[dict, list, dict], Result]


def _intercity(modes: tuple[str, ...], key: str) -> Checker:
    """A checker that the outbound/inbound `<key>_no` of the constraint is an intercity number of `modes`."""

    def check(data: dict, plan_days: list, meta: dict) -> Result:
        numbers = P.intercity_numbers(plan_days, modes)
        for direction in ("outbound", "inbound"):
            wanted = data.get(f"{direction}_{key}_no")
            if wanted is not None and wanted not in numbers:
                return False, f"required {direction} {key} {wanted} not in the plan"
        return True, None

    check.__name__ = f"check_{key}"
    return check


def check_hotel(data: dict, plan_days: list, meta: dict) -> Result:
    """The constraint's hotel is the accommodation of some day."""
    wanted = data.get("hotel_name")
    if not wanted:
        return False, "constraint names no hotel"
    return (True, None) if wanted in P.hotel_names(plan_days) else (False, f"hotel {wanted} not in the plan")


def check_restaurant(data: dict, plan_days: list, meta: dict) -> Result:
    """The constraint's restaurant is one of the plan's meals."""
    wanted = data.get("restaurant_name")
    if not wanted:
        return False, "constraint names no restaurant"
    meals = set(P.names_of(plan_days, "meal"))
    return (True, None) if wanted in meals else (False, f"restaurant {wanted} not in the plan")


def check_attractions(data: dict, plan_days: list, meta: dict) -> Result:
    """Every attraction the constraint lists is visited."""
    wanted = data.get("attraction_names") or []
    if not wanted:
        return False, "constraint names no attraction"
    visited = set(P.names_of(plan_days, "attraction"))
    missing = [name for name in wanted if name not in visited]
    return (False, f"attractions not in the plan: {missing}") if missing else (True, None)


def check_budget(data: dict, plan_days: list, meta: dict) -> Result:
    """The plan's total cost (yuan) is at most max_budget."""
    limit = P.number(data.get("max_budget"))
    if limit is None:
        return False, "constraint has no valid max_budget"
    if not plan_days:
        return False, "plan has no daily_plans"
    cost = P.plan_cost(plan_days, _count(meta, "people_number"), _count(meta, "room_number"))
    return (True, None) if cost <= limit else (False, f"cost {cost:.2f} exceeds budget {limit:.2f}")


def _count(meta: dict, key: str) -> int:
    """people_number / room_number of the task (1 when missing or malformed)."""
    try:
        return int(meta.get(key, 1))
    except (TypeError, ValueError):
        return 1


_FLIGHT = _intercity(P.FLIGHT_MODES, "flight")
_TRAIN = _intercity(P.TRAIN_MODES, "train")

CHECKERS: dict[str, Checker] = {
    **{name: _FLIGHT for name in (
        "flight_seat_class", "flight_seat_status", "flight_cheapest_direct", "flight_cheapest_airline_direct",
        "flight_cheapest_manufacturer_direct", "flight_earliest_departure_direct", "flight_earliest_airline_direct",
        "flight_shortest_duration_direct", "flight_departure_time_range", "flight_arrival_time_range")},
    **{name: _TRAIN for name in (
        "train_seat_class", "train_seat_status", "train_cheapest_direct", "train_cheapest_train_type",
        "train_earliest_departure_direct", "train_latest_arrival_direct", "train_shortest_duration_direct",
        "train_departure_time_range")},
    **{name: check_hotel for name in (
        "hotel_cheapest_brand", "hotel_cheapest_star", "hotel_highest_rated", "hotel_brand_highest_rated",
        "hotel_star_highest_rated", "hotel_newest_decoration", "hotel_price_range", "hotel_star_service_required")},
    **{name: check_restaurant for name in (
        "restaurant_cheapest_nearby_attraction", "restaurant_highest_rated", "restaurant_must_eat_named",
        "restaurant_closest_to_attraction", "restaurant_specific_cuisine_nearby", "restaurant_specific_tag_nearby")},
    **{name: check_attractions for name in (
        "attraction_must_visit_named", "attraction_all_of_type", "attraction_top_rated_must_visit",
        "attraction_all_free_attractions", "attraction_type_highest_rated")},
    "budget_constraint": check_budget,
}


def check_hard(plan: Any, meta: dict) -> dict[str, Result]:
    """Every hard constraint of the task checked against the plan: {type: (passed, reason)}.

    A type without a checker is left out (the official evaluation skips unknown types too); a checker
    that raises counts as failed.
    """
    constraints = meta.get("hard_constraints") if isinstance(meta, dict) else None
    plan_days = P.days(plan)
    results: dict[str, Result] = {}
    for kind, data in (constraints or {}).items():
        checker = CHECKERS.get(kind)
        if checker is None:
            continue
        try:
            results[kind] = checker(data if isinstance(data, dict) else {}, plan_days, meta)
        except Exception as exc:  # a malformed plan never ends scoring
            results[kind] = (False, f"checker error: {exc}")
    return results

"""Test helpers for the DeepPlanning environment: the shared data path, a small database in the
official layout, a fixture task over it, and a plan that satisfies that task."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

from agent.deepplanning.tools import TOOL_ARGS

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "deepplanning"

TRAIN_COLS = ["origin_city", "destination_city", "dep_date", "route_index", "segment_index", "train_no", "train_type",
              "seat_class", "seat_status", "price", "duration", "dep_datetime", "arr_datetime", "dep_station_code",
              "dep_station_name", "arr_station_code", "arr_station_name"]
FLIGHT_COLS = ["origin_city", "destination_city", "dep_date", "route_index", "segment_index", "flight_no", "airline",
               "seat_class", "seat_status", "price", "duration", "dep_datetime", "arr_datetime", "dep_station_code",
               "dep_station_name", "arr_station_code", "arr_station_name", "equip_size", "equip_type", "manufacturer"]

D1, D2 = "2025-11-12", "2025-11-13"
HEFEI_S, NANJING_S = "Hefei South Station", "Nanjing South Station"
HOTEL, HOTEL_PT = "Orange Hotel Nanjing", ("32.020000", "118.770000")
WALL, WALL_PT = "Nanjing City Wall", ("32.050000", "118.790000")
LAOMEN, LAOMEN_PT = "Laomendong", ("32.010000", "118.780000")
LAKE = "Xuanwu Lake"


def _train(origin, dest, date, route, seg, no, seat, status, price, dep, arr, dep_st, arr_st, minutes=60):
    return [origin, dest, date, route, seg, no, "High-speed", seat, status, price, minutes, f"{date} {dep}",
            f"{date} {arr}", "X", dep_st, "Y", arr_st]


# Every segment row of a route carries the route's origin and destination city (the official tools
# filter rows on them and derive a later segment's departure city from the previous arrival station).
TABLES = {
    "trains/trains.csv": [TRAIN_COLS,
        _train("Hefei", "Nanjing", D1, "1", "1", "G7798", "Second Class Seat", "6", "60", "08:00", "09:00", HEFEI_S, NANJING_S),
        _train("Hefei", "Nanjing", D1, "2", "1", "G100", "First Class Seat", "", "100", "07:00", "07:40", HEFEI_S, "Chuzhou Station", 40),
        _train("Hefei", "Nanjing", D1, "2", "2", "G101", "First Class Seat", "", "100", "08:00", "08:30", "Chuzhou Station", NANJING_S, 30),
        _train("Hefei", "Nanjing", D1, "10", "1", "D5", "Second Class Seat", "", "45", "10:00", "11:30", HEFEI_S, NANJING_S, 90),
        _train("Nanjing", "Hefei", D2, "1", "1", "G3031", "Second Class Seat", "7", "60", "18:00", "19:00", NANJING_S, HEFEI_S),
    ],
    "flights/flights.csv": [FLIGHT_COLS,
        ["Hefei", "Nanjing", D1, "1", "1", "MU1", "China Eastern", "Economy Class", "", "500", "50", f"{D1} 09:00",
         f"{D1} 09:50", "HFE", "Hefei Xinqiao Airport", "NKG", "Nanjing Lukou Airport", "M", "A320", "Airbus"],
        ["Hefei", "Nanjing", D1, "2", "1", "CA2", "Air China", "Business Class", "3", "900", "55", f"{D1} 15:00",
         f"{D1} 15:55", "HFE", "Hefei Xinqiao Airport", "NKG", "Nanjing Lukou Airport", "L", "B737", "Boeing"],
    ],
    "hotels/hotels.csv": [
        ["name", "address", "latitude", "longitude", "decoration_time", "hotel_star", "price", "score", "brand", "services", "tags"],
        [HOTEL, "1 Road", *HOTEL_PT, "2020", "3", "441", "4.6", "Orange Hotel", "Swimming Pool;Gym", "quiet|central"],
        ["Ji Hotel Xinjiekou", "2 Road", "32.030000", "118.760000", "2018", "4", "500", "4.8", "Ji Hotel", "", ""],
    ],
    "attractions/attractions.csv": [
        ["attraction_id", "attraction_name", "city", "address", "latitude", "longitude", "description", "rating",
         "opening_time", "closing_time", "closing_dates", "min_visit_hours", "max_visit_hours", "ticket_price", "attraction_type"],
        ["A1", LAOMEN, "Nanjing", "Laomen St", *LAOMEN_PT, "Old quarter", "4.7", "09:00", "22:00", "", "1", "3", "0", "Historical and Cultural"],
        ["A2", WALL, "Nanjing", "Wall Rd", *WALL_PT, "Ming wall", "4.6", "08:00", "18:00", "Monday", "2", "4", "50", "Historical and Cultural"],
        ["A3", LAKE, "Nanjing", "Lake Rd", "32.070000", "118.800000", "A lake", "4.5", "00:00", "00:00", "", "1", "3", "0", "Natural Scenery"],
    ],
    "restaurants/restaurants.csv": [
        ["query_latitude", "query_longitude", "restaurant_id", "restaurant_name", "latitude", "longitude", "price_per_person",
         "cuisine", "opening_time", "closing_time", "nearby_attraction_name", "rating", "tags"],
        [*LAOMEN_PT, "R1", "Six Dynasties Teahouse", "32.011000", "118.781000", "294", "Huaiyang", "10:00", "22:00", LAOMEN, "4.7", "Birthday Package;Private Room"],
        [*LAOMEN_PT, "R2", "Duck House", "32.012000", "118.782000", "80", "Jiangsu", "11:00", "21:00", LAOMEN, "4.2", ""],
        [*WALL_PT, "R3", "Noodle Bar", "32.051000", "118.791000", "40", "Noodles", "10:00", "20:00", WALL, "", ""],
    ],
    "locations/locations_coords.csv": [["poi_name", "latitude", "longitude"],
        [LAOMEN, *LAOMEN_PT], [HOTEL, *HOTEL_PT], [WALL, *WALL_PT]],
    "transportation/distance_matrix.csv": [["origin", "destination", "distance_meters", "duration_minutes", "cost"],
        [",".join(HOTEL_PT), ",".join(LAOMEN_PT), "1500", "20", "0"],
        [",".join(HOTEL_PT), ",".join(WALL_PT), "4200", "15", "20"]],
}

TASK = {
    "id": "7",
    "query": "Two days from Hefei to Nanjing for 3 people by train, 2 rooms, budget 3000 yuan.",
    "query_with_constraints": "...",
    "meta_info": {
        "org": "Hefei", "dest": ["Nanjing"], "days": 2, "depart_date": D1, "return_date": D2, "people_number": 3,
        "room_number": 2, "depart_weekday": 3,
        "hard_constraints": {
            "train_seat_status": {"outbound_train_no": "G7798", "inbound_train_no": "G3031", "people_number": 3},
            "hotel_star_service_required": {"hotel_name": HOTEL, "hotel_star": 3, "required_service": "Swimming Pool"},
            "restaurant_specific_tag_nearby": {"attraction_name": LAOMEN, "restaurant_name": "Six Dynasties Teahouse"},
            "attraction_must_visit_named": {"attraction_names": [LAOMEN, WALL]},
            "budget_constraint": {"max_budget": 3000},
        },
    },
}


def build_database(root: Path, task_id: str = "7") -> Path:
    """Writes the fixture tables under root/id_<task_id>/ in the official layout; returns root."""
    for rel, rows in TABLES.items():
        path = root / f"id_{task_id}" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)
    return root


def write_task_file(directory: Path, tasks: list[dict] | None = None, language: str = "en") -> Path:
    """A task file holding the fixture task, and the tool schemas beside it: the official ones when the shared
    data is there, else minimal schemas of the same 9 tools (names and required arguments)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"travelplanning_query_{language}.json"
    path.write_text(json.dumps(tasks or [TASK]), encoding="utf-8")
    schema = DATA / f"tool_schema_{language}.json"
    if schema.is_file():
        text = schema.read_text(encoding="utf-8")
    else:
        text = json.dumps([{"type": "function", "function": {
            "name": name, "parameters": {"type": "object", "properties": {a: {"type": "string"} for a in req + opt},
                                         "required": list(req)}}} for name, (req, opt) in TOOL_ARGS.items()])
    (directory / f"tool_schema_{language}.json").write_text(text, encoding="utf-8")
    return path


def _act(slot, kind, **details):
    return {"time_slot": slot, "type": kind, "details": details}


def good_plan() -> dict:
    """A plan meeting every hard constraint and every commonsense check on the fixture database (2774 yuan)."""
    return copy.deepcopy({
        "budget_summary": {"transportation": 500, "accommodation": 882, "meals": 1242, "attractions_and_tickets": 150,
                           "total_estimated_budget": 2774, "currency": "CNY"},
        "daily_plans": [
            {"day_number": 1, "current_city": "from Hefei to Nanjing",
             "accommodation": {"name": HOTEL, "price_per_night": 441},
             "activities": [
                 _act("08:00-09:00", "travel_intercity_public", mode="train", number="G7798", **{"from": HEFEI_S, "to": NANJING_S}, cost=60),
                 _act("09:00-09:30", "buffer", description="arrival"),
                 _act("09:30-10:00", "travel_city", **{"from": NANJING_S, "to": HOTEL}, distance="8km", duration="30min", cost=30),
                 _act("10:00-10:30", "hotel", activity="check-in", name=HOTEL),
                 _act("10:30-10:45", "travel_city", **{"from": HOTEL, "to": WALL}, distance="4.2km", duration="15min", cost=20),
                 _act("10:45-12:45", "attraction", name=WALL, city="Nanjing", cost=50),
                 _act("12:45-13:00", "travel_city", **{"from": WALL, "to": "Noodle Bar"}, distance="0.2km", duration="15min", cost=0),
                 _act("13:00-14:00", "meal", meal_type="lunch", name="Noodle Bar", cost=40),
                 _act("14:00-14:20", "travel_city", **{"from": "Noodle Bar", "to": LAOMEN}, distance="5km", duration="20min", cost=20),
                 _act("14:20-16:20", "attraction", name=LAOMEN, city="Nanjing", cost=0),
                 _act("16:20-17:00", "buffer", description="rest"),
                 _act("17:00-18:30", "meal", meal_type="dinner", name="Six Dynasties Teahouse", cost=294),
                 _act("18:30-19:00", "travel_city", **{"from": "Six Dynasties Teahouse", "to": HOTEL}, distance="3km", duration="20min", cost=20),
                 _act("19:00-24:00", "hotel", activity="rest", name=HOTEL)]},
            {"day_number": 2, "current_city": "from Nanjing to Hefei",
             "activities": [
                 _act("08:30-08:50", "travel_city", **{"from": HOTEL, "to": LAKE}, distance="5km", duration="20min", cost=20),
                 _act("08:50-11:50", "attraction", name=LAKE, city="Nanjing", cost=0),
                 _act("11:50-12:00", "travel_city", **{"from": LAKE, "to": "Duck House"}, distance="1km", duration="10min", cost=0),
                 _act("12:00-13:00", "meal", meal_type="lunch", name="Duck House", cost=80),
                 _act("13:00-17:00", "buffer", description="shopping"),
                 _act("17:00-17:30", "travel_city", **{"from": "Duck House", "to": NANJING_S}, distance="6km", duration="30min", cost=30),
                 _act("17:30-18:00", "buffer", description="boarding"),
                 _act("18:00-19:00", "travel_intercity_public", mode="train", number="G3031", **{"from": NANJING_S, "to": HEFEI_S}, cost=60)]},
        ],
    })


def answer(plan: object) -> str:
    """An assistant answer carrying `plan` in the <plan> block."""
    return f"Here is your itinerary.\n<plan>\n{json.dumps(plan, ensure_ascii=False)}\n</plan>"


def load_tasks(language: str) -> list[dict]:
    return json.loads((DATA / f"travelplanning_query_{language}.json").read_text(encoding="utf-8"))

"""DeepPlanning: the 9 tools on a small database in the official layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepplanning_fixtures import DATA, HOTEL, LAOMEN, LAOMEN_PT, HOTEL_PT, WALL_PT, TASK, build_database, write_task_file  # noqa: E402

from agent.deepplanning.tools import TOOL_ARGS  # noqa: E402
from agent.deepplanning.env import TravelEnv  # noqa: E402
from agent.env import ToolError  # noqa: E402


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path, "en")


def make_env(tmp_path: Path, language: str) -> TravelEnv:
    root = build_database(tmp_path / f"database_{language}")
    task_file = write_task_file(tmp_path / f"tasks_{language}", language=language)
    return TravelEnv(task_file=str(task_file), database_root=str(root), language=language)


def call(env, name, **arguments):
    task = env.tasks()[0]
    return env.call(env.start(task), name, arguments)


def test_tool_arguments_match_the_official_schemas():
    if not (DATA / "tool_schema_en.json").is_file():
        pytest.skip(f"tool schemas not found under {DATA}")
    for language in ("en", "zh"):
        schemas = json.loads((DATA / f"tool_schema_{language}.json").read_text(encoding="utf-8"))
        found = {s["function"]["name"]: s["function"]["parameters"] for s in schemas}
        assert set(found) == set(TOOL_ARGS)
        for name, (required, optional) in TOOL_ARGS.items():
            assert sorted(found[name]["required"]) == sorted(required)
            assert set(found[name]["properties"]) == set(required) | set(optional)


def test_trains_grouped_by_route_with_transfers_and_seat_filter(env):
    routes = json.loads(call(env, "query_train_info", origin="Hefei", destination="Nanjing", depDate="2025-11-12"))
    numbers = [r[0]["Segment 1"]["marketingTransportNo"] for r in routes]
    assert numbers == ["G7798", "D5", "G100"]  # route_index compared as text: "1" < "10" < "2"
    direct, slow, transfer = (r[0] for r in routes)
    assert direct["price"] == 60.0 and direct["Segment 1"]["Remaining Seats"] == "6"
    assert direct["Segment 1"]["duration"] == 60 and direct["Segment 1"]["depCityName"] == "Hefei"
    assert slow["Segment 1"]["Remaining Seats"] == "Available"
    assert transfer["Segment 2"]["marketingTransportNo"] == "G101" and transfer["Segment 2"]["depCityName"] == "Chuzhou"
    first = json.loads(call(env, "query_train_info", origin="Hefei", destination="Nanjing", depDate="2025-11-12",
                            seatClassName="First Class Seat"))
    assert [r[0]["Segment 1"]["marketingTransportNo"] for r in first] == ["G100"]
    with pytest.raises(ToolError, match="No train information found from Hefei to Nanjing on 2025-11-14"):
        call(env, "query_train_info", origin="Hefei", destination="Nanjing", depDate="2025-11-14")


def test_flights_are_plain_route_objects_with_aircraft(env):
    flights = json.loads(call(env, "query_flight_info", origin="Hefei", destination="Nanjing", depDate="2025-11-12"))
    assert [f["Segment 1"]["marketingTransportNo"] for f in flights] == ["MU1", "CA2"]
    assert flights[0]["Segment 1"]["manufacturer"] == "Airbus" and flights[0]["price"] == 500.0
    business = json.loads(call(env, "query_flight_info", origin="Hefei", destination="Nanjing",
                               depDate="2025-11-12", seatClassName="Business Class"))
    assert len(business) == 1 and business[0]["Segment 1"]["Remaining Seats"] == "3"
    with pytest.raises(ToolError, match="No flight information"):
        call(env, "query_flight_info", origin="Nanjing", destination="Hefei", depDate="2025-11-12")


def test_hotels_filter_by_star_and_brand_not_city(env):
    everything = json.loads(call(env, "query_hotel_info", destination="Anywhere", checkinDate="2025-11-12",
                                 checkoutDate="2025-11-13"))
    assert [h["name"] for h in everything] == [HOTEL, "Ji Hotel Xinjiekou"]
    assert everything[0]["services"] == ["Swimming Pool", "Gym"] and "services" not in everything[1]
    assert everything[0]["price"] == "441" and everything[0]["latitude"] == "32.020000"
    three = json.loads(call(env, "query_hotel_info", destination="Nanjing", checkinDate="2025-11-12",
                            checkoutDate="2025-11-13", hotelStar="3"))
    assert [h["name"] for h in three] == [HOTEL]
    with pytest.raises(ToolError, match="No hotel information found in Nanjing"):
        call(env, "query_hotel_info", destination="Nanjing", checkinDate="2025-11-12", checkoutDate="2025-11-13",
             hotelStar="3", hotelBrands="Ji Hotel")


def test_attraction_details_and_recommendations_are_text(env):
    details = call(env, "query_attraction_details", attraction_name="Nanjing City Wall")
    assert "Attraction Name：Nanjing City Wall" in details
    assert "Opening Hours：08:00 to 18:00" in details and "Closed Dates：Monday" in details
    assert "Ticket Price：50.0 RMB" in details and "Minimum Visit Duration：2.0 hours" in details
    assert "Opening Hours：00:00\n" in call(env, "query_attraction_details", attraction_name="Xuanwu Lake")
    with pytest.raises(ToolError, match="not found for attraction Nowhere"):
        call(env, "query_attraction_details", attraction_name="Nowhere")
    listing = call(env, "recommend_attractions", city="Nanjing")
    assert listing.startswith("Recommended attractions:\n\n") and listing.count("type attraction") == 3
    nature = call(env, "recommend_attractions", city="Nanjing", attraction_type="Natural Scenery")
    assert "Xuanwu Lake" in nature and LAOMEN not in nature
    with pytest.raises(ToolError, match="No attraction recommendations found"):
        call(env, "recommend_attractions", city="Nanjing", attraction_type="Theme Park")


def test_location_route_and_restaurants(env):
    assert json.loads(call(env, "search_location", place_name=LAOMEN)) == {
        "place_name": LAOMEN, "latitude": LAOMEN_PT[0], "longitude": LAOMEN_PT[1]}
    with pytest.raises(ToolError, match="Coordinate information not found for location Laomen"):
        call(env, "search_location", place_name="Laomen")
    walk = json.loads(call(env, "query_road_route_info", origin=",".join(HOTEL_PT), destination=",".join(LAOMEN_PT)))
    assert walk["distance_in_meters"] == 1500 and walk["duration_in_minutes"] == 20 and walk["cost"] == 0
    taxi = json.loads(call(env, "query_road_route_info", origin=",".join(HOTEL_PT), destination=",".join(WALL_PT)))
    assert taxi["cost"] == 20
    with pytest.raises(ToolError, match="Coordinate 32.02,118.77 is not in query range"):
        call(env, "query_road_route_info", origin="32.02,118.77", destination=",".join(WALL_PT))
    with pytest.raises(ToolError, match="No transportation information found"):
        call(env, "query_road_route_info", origin=",".join(LAOMEN_PT), destination=",".join(HOTEL_PT))
    near = json.loads(call(env, "recommend_restaurants", latitude=LAOMEN_PT[0], longitude=LAOMEN_PT[1]))
    assert [r["name"] for r in near] == ["Six Dynasties Teahouse", "Duck House"]
    assert near[0]["tags"] == ["Birthday Package", "Private Room"] and "tags" not in near[1]
    with pytest.raises(ToolError, match="No recommended restaurants found near"):
        call(env, "recommend_restaurants", latitude="32.01", longitude="118.78")
    noodle = json.loads(call(env, "query_restaurant_details", restaurant_name="Noodle Bar"))
    assert noodle["id"] == "R3" and noodle["price_per_person"] == "40" and noodle["rating"] == "4.0"
    with pytest.raises(ToolError, match="not found for restaurant Nope"):
        call(env, "query_restaurant_details", restaurant_name="Nope")


def test_bad_calls_raise_tool_errors(env):
    with pytest.raises(ToolError, match="unknown tool 'book_hotel'"):
        call(env, "book_hotel", hotel="x")
    with pytest.raises(ToolError, match="missing required argument 'depDate'"):
        call(env, "query_train_info", origin="Hefei", destination="Nanjing")
    with pytest.raises(ToolError, match="must be a string"):
        call(env, "search_location", place_name=["a"])
    with pytest.raises(ToolError, match="JSON object"):
        env.call(env.start(env.tasks()[0]), "search_location", "Laomendong")


def test_chinese_messages_and_labels(tmp_path):
    env = make_env(tmp_path, "zh")
    routes = json.loads(call(env, "query_train_info", origin="Hefei", destination="Nanjing", depDate="2025-11-12"))
    assert routes[1][0]["第1段"]["剩余票数量"] == "充足"
    assert "景点名称：Laomendong" in call(env, "query_attraction_details", attraction_name=LAOMEN)
    with pytest.raises(ToolError, match="未找到景点推荐"):
        call(env, "recommend_attractions", city="南京", attraction_type="主题乐园")


def test_rollouts_are_isolated_and_the_database_is_read_only(env):
    task = env.tasks()[0]
    first, second = env.start(task), env.start(task)
    env.call(first, "search_location", {"place_name": LAOMEN})
    assert len(first.calls) == 1 and second.calls == []
    assert first.database is second.database  # shared cache ...
    row = first.database.rows("locations")[0]
    with pytest.raises(TypeError):
        row["latitude"] = "0"  # ... that no conversation can change
    assert json.loads(env.call(second, "search_location", {"place_name": LAOMEN}))["latitude"] == LAOMEN_PT[0]


def test_missing_task_database_is_a_tool_error(tmp_path):
    task_file = write_task_file(tmp_path / "tasks", [dict(TASK, id="99")])
    env = TravelEnv(task_file=str(task_file), database_root=str(build_database(tmp_path / "db")))
    with pytest.raises(ToolError, match="database of task 99 is not available"):
        call(env, "search_location", place_name=LAOMEN)

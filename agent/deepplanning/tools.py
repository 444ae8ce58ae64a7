"""The 9 DeepPlanning travel tools over one task's database (behaviour of the official tools).

Each tool takes the call's arguments (already checked against TOOL_ARGS) and returns the official
result string: JSON (indent 2, non-ASCII kept) for trains, flights, hotels, restaurants, locations
and road routes; plain text for the attraction tools. Where the official tool answers with a
"not found" / "database not loaded" message, these raise ToolError with that message instead, so the
rollout counts it as a failed call; the model reads the same text either way.

Filters follow the official code: exact string matches on the CSV cells; hotels and
recommend_attractions do not filter by city (each task's database holds only its own cities);
routes are grouped by route_index and segments ordered by segment_index, both compared as
strings like the official pandas code (which reads every column as text).
"""

from __future__ import annotations

import json
from typing import Callable

from agent.deepplanning.database import Row, TaskDatabase
from agent.env import ToolError

# name -> (required arguments, optional arguments); all are strings
TOOL_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "query_train_info": (("origin", "destination", "depDate"), ("seatClassName",)),
    "query_flight_info": (("origin", "destination", "depDate"), ("seatClassName",)),
    "query_hotel_info": (("destination", "checkinDate", "checkoutDate"), ("hotelStar", "hotelBrands")),
    "query_attraction_details": (("attraction_name",), ()),
    "recommend_attractions": (("city",), ("attraction_type",)),
    "search_location": (("place_name",), ()),
    "query_road_route_info": (("origin", "destination"), ()),
    "recommend_restaurants": (("latitude", "longitude"), ()),
    "query_restaurant_details": (("restaurant_name",), ()),
}

_TEXT = {
    "en": {
        "segment": "Segment {}", "seats": "Remaining Seats", "available": "Available",
        "no_db": "Database not loaded", "no_train": "No train information found from {} to {} on {}",
        "no_flight": "No flight information found from {} to {} on {}",
        "no_hotel": "No hotel information found in {} from {} to {}, please check parameters or reduce constraints",
        "no_attraction": "Detailed information not found for attraction {}",
        "no_recommend": "No attraction recommendations found",
        "no_place": "Coordinate information not found for location {}; use a place name exactly as another tool returned it",
        "no_coord": "Coordinate {} is not in query range; use coordinates exactly as a tool returned them (6 decimal places)",
        "no_route": "No transportation information found from {} to {}",
        "no_restaurants": "No recommended restaurants found near coordinates ({}, {}), please check coordinate source",
        "no_restaurant": "Detailed information not found for restaurant {}",
        "station": " Station",
    },
    "zh": {
        "segment": "第{}段", "seats": "剩余票数量", "available": "充足",
        "no_db": "数据库未加载", "no_train": "未找到从 {} 到 {} 在 {} 的火车票信息",
        "no_flight": "未找到从 {} 到 {} 在 {} 的航班信息",
        "no_hotel": "未找到满足条件的 {} 在 {} 到 {} 的酒店信息,请检查参数信息或减少约束条件",
        "no_attraction": "未找到景点 {} 的详细信息",
        "no_recommend": "未找到景点推荐",
        "no_place": "未找到地点 {} 的坐标信息，请使用其他工具返回结果中完全一致的地点名称",
        "no_coord": "坐标 {} 不在查询范围内，请使用工具返回的坐标（保留6位小数，完全一致）",
        "no_route": "未找到从 {} 到 {} 的交通信息",
        "no_restaurants": "未找到坐标 ({}, {}) 附近的推荐餐厅, 请检查坐标来源",
        "no_restaurant": "未找到餐厅 {} 的详细信息",
        "station": "站",
    },
}

_ATTRACTION_LABELS = {
    "en": ("Attraction ID", "Attraction Name", "City", "Address", "Coordinates", "Latitude", "Longitude",
           "Description", "Rating", "(average visitor rating)", "Opening Hours", "to", "Closed Dates",
           "Minimum Visit Duration", "Maximum Visit Duration", "hours", "Ticket Price", "RMB", "Attraction Type"),
    "zh": ("景点ID", "景点名称", "所属城市", "地址", "经纬度坐标", "纬度", "经度", "景点简介", "用户评分",
           "（游客平均评价）", "开放时间", "至", "闭馆日期", "建议最短游玩时长", "建议最长游玩时长", "小时",
           "门票价格", "元", "景点类型"),
}


def run_tool(db: TaskDatabase, language: str, name: str, arguments: dict) -> str:
    """Runs tool `name` on `db`; ToolError for an unknown tool, bad arguments or an empty result."""
    if name not in TOOL_ARGS:
        raise ToolError(f"unknown tool {name!r} (tools: {', '.join(TOOL_ARGS)})")
    args = check_arguments(name, arguments)
    words = _TEXT.get(language, _TEXT["en"])
    return _TOOLS[name](db, words, language, args)


def check_arguments(name: str, arguments: object) -> dict[str, str]:
    """The call's arguments as strings; ToolError for a missing required or non-string argument.

    Numbers are accepted and written as the model wrote them (str of the number); arguments the tool
    does not take are ignored, as the official tools ignore them.
    """
    if not isinstance(arguments, dict):
        raise ToolError(f"{name}: arguments must be a JSON object")
    required, optional = TOOL_ARGS[name]
    args: dict[str, str] = {}
    for key in required + optional:
        value = arguments.get(key)
        if value is None or value == "":
            if key in required:
                raise ToolError(f"{name}: missing required argument {key!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ToolError(f"{name}: argument {key!r} must be a string")
        args[key] = str(value).strip()
    return args


def _table(db: TaskDatabase, table: str, words: dict) -> tuple[Row, ...]:
    rows = db.rows(table)
    if rows is None:
        raise ToolError(words["no_db"])
    return rows


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2)


def _int(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return 0


def _float_or(value: str, default):
    try:
        return float(value)
    except ValueError:
        return default


def _routes(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by route_index, each route's segments ordered by segment_index (string order)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.get("route_index", ""), []).append(row)
    return [sorted(groups[key], key=lambda r: r.get("segment_index", "")) for key in sorted(groups)]


def _segment(row: Row, words: dict, dep_city: str) -> dict:
    """The fields both intercity tools show for one segment."""
    return {
        "arrCityName": row.get("destination_city", ""), "arrStationCode": row.get("arr_station_code", ""),
        "arrStationName": row.get("arr_station_name", ""), "depCityName": dep_city,
        "depStationCode": row.get("dep_station_code", ""), "depStationName": row.get("dep_station_name", ""),
        "duration": _int(row.get("duration", "")), "arrDateTime": row.get("arr_datetime", ""),
        "depDateTime": row.get("dep_datetime", ""),
    }


def _intercity_rows(db, words, table, args, missing_key) -> list[Row]:
    rows = [r for r in _table(db, table, words)
            if r.get("origin_city") == args["origin"] and r.get("destination_city") == args["destination"]
            and r.get("dep_date") == args["depDate"]]
    if args.get("seatClassName"):
        rows = [r for r in rows if r.get("seat_class") == args["seatClassName"]]
    if not rows:
        raise ToolError(words[missing_key].format(args["origin"], args["destination"], args["depDate"]))
    return rows


def query_train_info(db, words, language, args) -> str:
    """Train routes origin -> destination on depDate: a list of [route], route = {"Segment i": {...}, "price"}."""
    result = []
    for route in _routes(_intercity_rows(db, words, "trains", args, "no_train")):
        shown: dict = {}
        for i, row in enumerate(route, 1):
            dep_city = row.get("origin_city", "") if i == 1 else route[i - 2].get("arr_station_name", "").split(words["station"])[0]
            segment = _segment(row, words, dep_city)
            segment.update({"marketingTransportName": row.get("train_type", ""),
                            "marketingTransportNo": row.get("train_no", ""), "seatClassName": row.get("seat_class", ""),
                            words["seats"]: row.get("seat_status") or words["available"]})
            shown[words["segment"].format(i)] = segment
        shown["price"] = _float_or(route[0].get("price", ""), 0)
        result.append([shown])
    return _json(result)


def query_flight_info(db, words, language, args) -> str:
    """Flight routes origin -> destination on depDate: a list of {"Segment i": {...}, "price"}."""
    result = []
    for route in _routes(_intercity_rows(db, words, "flights", args, "no_flight")):
        shown: dict = {}
        for i, row in enumerate(route, 1):
            segment = _segment(row, words, row.get("origin_city", ""))
            segment.update({"marketingTransportName": row.get("airline", ""),
                            "marketingTransportNo": row.get("flight_no", ""), "seatClassName": row.get("seat_class", ""),
                            words["seats"]: row.get("seat_status") or words["available"],
                            "equipSize": row.get("equip_size", ""), "equipType": row.get("equip_type", ""),
                            "manufacturer": row.get("manufacturer", "")})
            shown[words["segment"].format(i)] = segment
        shown["price"] = _float_or(route[0].get("price", ""), 0)
        result.append(shown)
    return _json(result)


def query_hotel_info(db, words, language, args) -> str:
    """Hotels of the task database, filtered by hotelStar and hotelBrands when given (not by city)."""
    rows = list(_table(db, "hotels", words))
    if args.get("hotelStar"):
        rows = [r for r in rows if r.get("hotel_star") == args["hotelStar"]]
    if args.get("hotelBrands"):
        rows = [r for r in rows if r.get("brand") == args["hotelBrands"]]
    if not rows:
        raise ToolError(words["no_hotel"].format(args["destination"], args["checkinDate"], args["checkoutDate"]))
    result = []
    for row in rows:
        hotel = {"name": row.get("name", ""), "address": row.get("address", ""), "latitude": row.get("latitude", ""),
                 "longitude": row.get("longitude", ""), "decorationTime": row.get("decoration_time", ""),
                 "hotelStar": row.get("hotel_star", ""), "price": row.get("price", ""), "score": row.get("score", ""),
                 "brand": row.get("brand", "")}
        if row.get("services"):
            hotel["services"] = row["services"].split(";")
        result.append(hotel)
    return _json(result)


def query_attraction_details(db, words, language, args) -> str:
    """One attraction's details as labelled text lines (the first row of that exact name)."""
    name = args["attraction_name"]
    row = next((r for r in _table(db, "attractions", words) if r.get("attraction_name") == name), None)
    if row is None:
        raise ToolError(words["no_attraction"].format(name))
    (l_id, l_name, l_city, l_addr, l_coord, l_lat, l_lon, l_desc, l_rating, l_visitor, l_open, l_to, l_closed,
     l_min, l_max, l_hours, l_price, l_unit, l_type) = _ATTRACTION_LABELS.get(language, _ATTRACTION_LABELS["en"])
    opening, closing = row.get("opening_time", ""), row.get("closing_time", "")
    hours = opening if opening == closing else f"{opening} {l_to} {closing}"
    lines = [
        f"{l_id}：{row.get('attraction_id', '')}", f"{l_name}：{row.get('attraction_name', name)}",
        f"{l_city}：{row.get('city', '')}", f"{l_addr}：{row.get('address', '')}",
        f"{l_coord}：{l_lat} {row.get('latitude', '')}，{l_lon} {row.get('longitude', '')}",
        f"{l_desc}：{row.get('description', '')}",
        f"{l_rating}：{_float_or(row.get('rating', ''), '')}{l_visitor}", f"{l_open}：{hours}",
        f"{l_closed}：{row.get('closing_dates', '')}",
        f"{l_min}：{_float_or(row.get('min_visit_hours', ''), '')} {l_hours}",
        f"{l_max}：{_float_or(row.get('max_visit_hours', ''), '')} {l_hours}",
        f"{l_price}：{_float_or(row.get('ticket_price', ''), '0')} {l_unit}",
        f"{l_type}：{row.get('attraction_type', '')}",
    ]
    return "\n".join(lines)


def recommend_attractions(db, words, language, args) -> str:
    """Every attraction of the task database (filtered by attraction_type when given), one per line."""
    rows = list(_table(db, "attractions", words))
    if args.get("attraction_type"):
        rows = [r for r in rows if r.get("attraction_type") == args["attraction_type"]]
    if not rows:
        raise ToolError(words["no_recommend"])
    if language == "zh":
        lines = [f"{r.get('attraction_name', '')}，{r.get('description', '')}这是一个{r.get('attraction_type', '')}类型的景点" for r in rows]
        header = "推荐的景点有：\n"
    else:
        lines = [f"{r.get('attraction_name', '')}, {r.get('description', '')}. This is a {r.get('attraction_type', '')} type attraction" for r in rows]
        header = "Recommended attractions:\n"
    return "\n".join([header] + lines)


def search_location(db, words, language, args) -> str:
    """A place's coordinates {place_name, latitude, longitude} (exact name match)."""
    name = args["place_name"]
    row = next((r for r in _table(db, "locations", words) if r.get("poi_name", r.get("place_name")) == name), None)
    if row is None:
        raise ToolError(words["no_place"].format(name))
    return _json({"place_name": row.get("poi_name", row.get("place_name", name)),
                  "latitude": row.get("latitude", ""), "longitude": row.get("longitude", "")})


def query_road_route_info(db, words, language, args) -> str:
    """Distance (m), duration (min) and cost (yuan per vehicle) between two "lat,lon" points.

    The cost is the table's: 0 for walking (2 km or less), a taxi fare otherwise; a taxi carries 4.
    Each coordinate must occur somewhere in the table, else the coordinate itself is reported.
    """
    rows = _table(db, "distances", words)
    known = {r.get("origin") for r in rows} | {r.get("destination") for r in rows}
    for point in (args["origin"], args["destination"]):
        if point not in known:
            raise ToolError(words["no_coord"].format(point))
    row = next((r for r in rows if r.get("origin") == args["origin"] and r.get("destination") == args["destination"]), None)
    if row is None:
        raise ToolError(words["no_route"].format(args["origin"], args["destination"]))
    return _json({"origin": row.get("origin"), "destination": row.get("destination"),
                  "distance_in_meters": _int(row.get("distance_meters", "")),
                  "duration_in_minutes": _int(row.get("duration_minutes", "")), "cost": _int(row.get("cost", ""))})


def _restaurant(row: Row, default_price: str, default_rating: str) -> dict:
    shown = {"name": row.get("restaurant_name", ""), "latitude": row.get("latitude") or "0",
             "longitude": row.get("longitude") or "0", "price_per_person": row.get("price_per_person") or default_price,
             "cuisine": row.get("cuisine", ""), "opening_time": row.get("opening_time", ""),
             "closing_time": row.get("closing_time", ""), "nearby_attraction_name": row.get("nearby_attraction_name", ""),
             "rating": row.get("rating") or default_rating}
    if row.get("tags"):
        shown["tags"] = row["tags"].split(";")
    return shown


def recommend_restaurants(db, words, language, args) -> str:
    """Restaurants recommended for exactly this (latitude, longitude) query point."""
    rows = [r for r in _table(db, "restaurants", words)
            if r.get("query_latitude") == args["latitude"] and r.get("query_longitude") == args["longitude"]]
    if not rows:
        raise ToolError(words["no_restaurants"].format(args["latitude"], args["longitude"]))
    return _json([_restaurant(r, "0", "4.5") for r in rows])


def query_restaurant_details(db, words, language, args) -> str:
    """One restaurant's details (first row of that exact name), with its id."""
    name = args["restaurant_name"]
    row = next((r for r in _table(db, "restaurants", words) if r.get("restaurant_name") == name), None)
    if row is None:
        raise ToolError(words["no_restaurant"].format(name))
    return _json({"id": row.get("restaurant_id", ""), **_restaurant(row, "100", "4.0")})


_TOOLS: dict[str, Callable[..., str]] = {
    "query_train_info": query_train_info, "query_flight_info": query_flight_info,
    "query_hotel_info": query_hotel_info, "query_attraction_details": query_attraction_details,
    "recommend_attractions": recommend_attractions, "search_location": search_location,
    "query_road_route_info": query_road_route_info, "recommend_restaurants": recommend_restaurants,
    "query_restaurant_details": query_restaurant_details,
}

"""A task's database: the official CSV tables of `database_<lang>/id_<task id>/`, read lazily.

Layout (file per table, as the official agent maps tools to files):

    trains/trains.csv                  origin_city, destination_city, dep_date, route_index, segment_index,
                                       train_no, train_type, seat_class, seat_status, price, duration (min),
                                       dep_datetime, arr_datetime, dep_station_code/name, arr_station_code/name
    flights/flights.csv                as trains, with flight_no, airline, equip_size, equip_type, manufacturer
    hotels/hotels.csv                  name, address, latitude, longitude, decoration_time, hotel_star, price
                                       (yuan per room-night), score, brand, services (';'-separated)
    attractions/attractions.csv        attraction_id, attraction_name, city, address, latitude, longitude,
                                       description, rating, opening_time, closing_time, closing_dates,
                                       min_visit_hours, max_visit_hours, ticket_price (yuan), attraction_type
    restaurants/restaurants.csv        query_latitude, query_longitude (the point a row is recommended for),
                                       restaurant_id, restaurant_name, latitude, longitude, price_per_person,
                                       cuisine, opening_time, closing_time, nearby_attraction_name, rating, tags
    locations/locations_coords.csv     poi_name (or place_name), latitude, longitude
    transportation/distance_matrix.csv origin, destination ("lat,lon" strings), distance_meters,
                                       duration_minutes, cost (yuan per vehicle)

Cells are kept as strings (the official tools read every column as a string, so coordinates keep
their six decimals). Rows are read-only mappings: one loaded database can serve any number of
conversations without one changing what another sees.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

TABLES = {
    "trains": "trains/trains.csv",
    "flights": "flights/flights.csv",
    "hotels": "hotels/hotels.csv",
    "attractions": "attractions/attractions.csv",
    "restaurants": "restaurants/restaurants.csv",
    "locations": "locations/locations_coords.csv",
    "distances": "transportation/distance_matrix.csv",
}

Row = Mapping[str, str]


class TaskDatabase:
    """The CSV tables of one task directory, each loaded on first use and then cached."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._tables: dict[str, tuple[Row, ...] | None] = {}

    def exists(self) -> bool:
        """Whether the task directory is there at all."""
        return self.directory.is_dir()

    def path(self, table: str) -> Path:
        """Where `table` (a key of TABLES) lives."""
        return self.directory / TABLES[table]

    def has(self, table: str) -> bool:
        """Whether `table`'s CSV file exists."""
        return self.path(table).is_file()

    def rows(self, table: str) -> tuple[Row, ...] | None:
        """All rows of `table` (None when its file is missing)."""
        if table not in self._tables:
            self._tables[table] = _read(self.path(table)) if self.has(table) else None
        return self._tables[table]


def _read(path: Path) -> tuple[Row, ...]:
    """A CSV file as read-only rows of stripped strings (missing cells become '')."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return tuple(
            MappingProxyType({k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
            for row in csv.DictReader(fh)
        )

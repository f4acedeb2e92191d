"""Quality tags from fav_count percentiles computed per rating (recipe.md §2).

A post gets the tag of the highest level whose threshold its fav_count is strictly
*above*; a fav_count exactly equal to a threshold gets the lower tag. Thresholds are
``numpy.percentile(fav_counts_of_that_rating, p)`` with NumPy's default ("linear")
method: the sorted values x[0..n-1] are read at position p/100 * (n-1), interpolating
between the two neighbours when that position is fractional; rounded to 6 decimals.
"""
from __future__ import annotations

import math

import numpy as np

from .db import RATINGS
from .errors import HakubooruError

# (percentile, tag) from the highest level down; below every level: LOWEST_QUALITY.
QUALITY_LEVELS = (
    (90, "masterpiece"),
    (75, "best quality"),
    (60, "great quality"),
    (45, "good quality"),
    (30, "normal quality"),
    (10, "low quality"),
)
LOWEST_QUALITY = "worst quality"
NO_QUALITY_ABOVE_ID = 7_500_000  # HakuBooru's rule: newer posts have too few favourites yet


class QualityThresholds:
    """fav_count thresholds per rating: ``{rating: {percentile: threshold}}``.

    Build from the database (``from_db``), from arrays (``from_values``), or from a fixed
    table (the constructor; JSON-style string keys such as ``"90"`` are accepted). A rating
    missing from the table gets no quality tag.
    """

    def __init__(self, table: dict):
        if not isinstance(table, dict):
            raise HakubooruError("quality table must map rating -> {percentile: threshold}")
        self.table: dict[str, dict[int, float]] = {}
        percentiles = [p for p, _ in QUALITY_LEVELS]
        for rating, levels in table.items():
            if rating not in RATINGS:
                raise HakubooruError(f"quality table: unknown rating {rating!r}; expected one of {', '.join(RATINGS)}")
            try:
                row = {int(p): float(v) for p, v in dict(levels).items()}
            except (TypeError, ValueError):
                raise HakubooruError(f"quality table for {rating}: percentiles and thresholds must be numbers") from None
            if sorted(row) != sorted(percentiles):
                raise HakubooruError(
                    f"quality table for {rating}: needs exactly the percentiles {percentiles}, got {sorted(row)}"
                )
            values = [row[p] for p in sorted(row)]
            if not all(math.isfinite(v) for v in values):
                raise HakubooruError(f"quality table for {rating}: thresholds must be finite numbers, got {values}")
            if any(a > b for a, b in zip(values, values[1:])):
                raise HakubooruError(f"quality table for {rating}: thresholds must not decrease as the percentile grows")
            self.table[rating] = row
        # ascending thresholds per rating code (index into RATINGS); NaN row = no table
        self._ascending = np.full((len(RATINGS), len(QUALITY_LEVELS)), np.nan)
        for rating, row in self.table.items():
            self._ascending[RATINGS.index(rating)] = [row[p] for p in sorted(row)]
        # level index (count of thresholds strictly below fav_count) -> tag
        self.tags = (LOWEST_QUALITY,) + tuple(tag for _, tag in reversed(QUALITY_LEVELS))

    @classmethod
    def from_values(cls, ratings, fav_counts) -> "QualityThresholds":
        """Percentiles of fav_count within each rating, from parallel arrays of rating
        codes (0 general .. 3 explicit) and fav_counts."""
        ratings = np.asarray(ratings, dtype=np.int64)
        fav_counts = np.asarray(fav_counts, dtype=np.float64)
        percentiles = [p for p, _ in QUALITY_LEVELS]
        table = {}
        for code, rating in enumerate(RATINGS):
            values = fav_counts[ratings == code]
            if len(values):
                # rounding removes interpolation noise (95.79999999998836 -> 95.8)
                thresholds = np.round(np.percentile(values, percentiles), 6)
                table[rating] = dict(zip(percentiles, thresholds.tolist()))
        return cls(table)

    @classmethod
    def from_db(cls, db, no_quality_above_id: int | None = NO_QUALITY_ABOVE_ID) -> "QualityThresholds":
        """Percentiles from one pass over the database's (rating, fav_count) columns; posts
        with id > no_quality_above_id (None: no limit) are left out of the statistics."""
        sql = "SELECT rating, fav_count FROM post WHERE fav_count IS NOT NULL AND rating BETWEEN 0 AND 3"
        params = ()
        if no_quality_above_id is not None:
            sql += " AND id <= ?"
            params = (int(no_quality_above_id),)
        cursor = db.execute_sql(sql, params)
        dtype = np.dtype([("rating", np.int64), ("fav_count", np.int64)])
        chunks = []
        while rows := cursor.fetchmany(500_000):
            chunks.append(np.fromiter(rows, dtype=dtype, count=len(rows)))
        data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        return cls.from_values(data["rating"], data["fav_count"])

    def levels(self, rating_codes: np.ndarray, fav_counts: np.ndarray) -> np.ndarray:
        """Vectorised: index into ``self.tags`` for each post, or -1 for no quality tag
        (rating code outside 0-3 or without a table, or fav_count NaN)."""
        rating_codes = np.asarray(rating_codes, dtype=np.int64)
        fav_counts = np.asarray(fav_counts, dtype=np.float64)
        out = np.full(len(rating_codes), -1, dtype=np.int64)
        for code in range(len(RATINGS)):
            thresholds = self._ascending[code]
            if np.isnan(thresholds[0]):
                continue
            mask = (rating_codes == code) & ~np.isnan(fav_counts)
            # side="left" counts thresholds strictly below the value: a tie stays on the lower level
            out[mask] = np.searchsorted(thresholds, fav_counts[mask], side="left")
        return out

    def tag(self, rating: str, fav_count: int) -> str | None:
        """The quality tag of one post, or None when its rating has no thresholds."""
        if rating not in RATINGS or fav_count is None:
            return None
        level = self.levels([RATINGS.index(rating)], [fav_count])[0]
        return self.tags[level] if level >= 0 else None

    def to_dict(self) -> dict:
        """The table as JSON-able data (for manifests and Parquet metadata)."""
        return {r: {str(p): v for p, v in row.items()} for r, row in self.table.items()}

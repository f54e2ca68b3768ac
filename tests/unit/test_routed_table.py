"""The router's table of decisions forgets published query ids after the horizon."""

from __future__ import annotations

from workers.stream.router import DECIDED, PUBLISHED, forgettable, published_marker


def test_a_published_marker_older_than_the_cutoff_is_forgotten_in_its_partition() -> None:
    marker = published_marker(partition=3, at=1_000.0)
    assert marker.startswith(PUBLISHED)
    assert forgettable(marker, cutoff=1_001.0) == 3
    assert forgettable(marker, cutoff=999.0) is None  # still inside the horizon


def test_decisions_not_yet_published_and_unreadable_markers_are_kept() -> None:
    assert forgettable(DECIDED + b'{"query_id": "q"}', cutoff=10**12) is None
    assert forgettable(PUBLISHED, cutoff=10**12) is None  # a marker from before the horizon existed
    assert forgettable(PUBLISHED + b"x:y", cutoff=10**12) is None

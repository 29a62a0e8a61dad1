"""kvmem.memory.dates: dates a turn speaks of (resolved against its session date) and dates a question asks."""

from __future__ import annotations

import datetime as dt

import pytest

import kvmem
from kvmem.memory.dates import date_match, event_spans, parse_date, query_spans, strip_dates

D = dt.date
MONDAY = D(2023, 5, 15)  # a Monday


@pytest.mark.parametrize("text, span", [
    ("I went to the support group yesterday", (D(2023, 5, 14), D(2023, 5, 14))),
    ("We did the ridge trail last weekend", (D(2023, 5, 13), D(2023, 5, 14))),
    ("Saw them live last Friday!", (D(2023, 5, 12), D(2023, 5, 12))),
    ("Ran a 10k two days ago", (D(2023, 5, 13), D(2023, 5, 13))),
    ("Back from camping, we went last week", (D(2023, 5, 8), D(2023, 5, 14))),
    ("Made pancakes this morning", (MONDAY, MONDAY)),
    ("Interview is next Wednesday", (D(2023, 5, 17), D(2023, 5, 17))),
    ("The gig was on 3 March 2023", (D(2023, 3, 3), D(2023, 3, 3))),
])
def test_event_spans_resolve_against_the_session_date(text, span):
    assert span in event_spans(text, MONDAY)


def test_without_a_session_date_only_absolute_dates_count():
    assert event_spans("I went there yesterday", None) == []
    assert event_spans("Booked for 2023-06-01", None) == [(D(2023, 6, 1), D(2023, 6, 1))]


@pytest.mark.parametrize("query, span", [
    ("What did Maya do on 14 May 2023?", (D(2023, 5, 14), D(2023, 5, 14))),
    ("What did Leo do the weekend before May 15, 2023?", (D(2023, 5, 13), D(2023, 5, 14))),
    ("What happened in the week of 8 May 2023?", (D(2023, 5, 8), D(2023, 5, 14))),
    ("What did I buy the day before 1 November 2022?", (D(2022, 10, 31), D(2022, 10, 31))),
    ("Anything planned in June 2023?", (D(2023, 6, 1), D(2023, 6, 30))),
])
def test_query_spans_read_the_words_around_a_date(query, span):
    assert query_spans(query) == [span]


def test_a_date_without_a_year_is_tried_in_the_index_years():
    assert query_spans("What happened on May 14th?", years=[2022, 2023]) == [
        (D(2022, 5, 14), D(2022, 5, 14)), (D(2023, 5, 14), D(2023, 5, 14))]
    assert query_spans("What happened on May 14th?") == []
    assert query_spans("What did she say about the dog?") == []


def test_date_match_prefers_the_event_over_the_session_day():
    asked = query_spans("What did Leo do the weekend before May 15, 2023?")
    assert date_match(event_spans("hiked last weekend", MONDAY), MONDAY, asked) == 1.0
    assert date_match([], D(2023, 5, 13), asked) == 0.5  # said that weekend, about nothing dated
    assert date_match(event_spans("hiked yesterday", D(2023, 5, 30)), D(2023, 5, 30), asked) == 0.0
    assert date_match(event_spans("hiked last weekend", MONDAY), MONDAY, []) == 0.0


def test_strip_dates_leaves_the_question():
    assert strip_dates("What did Leo do on 14 May 2023?") == "What did Leo do on ?"


@pytest.mark.parametrize("value", ["May the 8th", "2023-13-01", 20230508, ""])
def test_bad_session_dates_are_refused(value):
    with pytest.raises(kvmem.CubeError, match="ISO date"):
        parse_date(value)
    with pytest.raises(kvmem.CubeError, match="ISO date"):
        kvmem.MemoryIndex(dense=False).add("m", "text", {"date": value})


def test_good_session_dates():
    assert parse_date("2023-05-08") == parse_date("2023-05-08T14:03:00") == parse_date(dt.datetime(2023, 5, 8, 9))

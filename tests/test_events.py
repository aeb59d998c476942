"""shared.events.Event: the wire form of a token event (pure logic)."""

from __future__ import annotations

import dataclasses

import orjson

from shared.events import Event, error_payload


def test_encode_leaves_out_empty_fields_and_decode_restores_every_field():
    assert orjson.loads(Event(3, "hi", [7, 8]).encode()) == {"seq": 3, "text": "hi", "ids": [7, 8]}
    assert orjson.loads(Event(0).encode()) == {"seq": 0}
    full = Event(9, "end", [1], "length", {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
                 error_payload("boom", code="x"))
    assert all(getattr(full, f.name) for f in dataclasses.fields(Event))  # every field set: none forgotten
    assert Event.decode(full.encode()) == full

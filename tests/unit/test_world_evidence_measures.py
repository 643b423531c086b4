"""The picture measures of bench/world_evidence.py on hand-made detections, values worked by hand."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import world_evidence as we  # noqa: E402
from sprite_world import render  # noqa: E402


def test_tv_by_hand():
    from collections import Counter

    # p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2): TV = (1/4 + 1/4 + 1/2) / 2 = 1/2
    assert we.tv(Counter({"a": 1, "b": 1}), Counter({"a": 1, "b": 1, "c": 2})) == pytest.approx(0.5)
    assert we.tv(Counter({"a": 3}), Counter({"a": 5})) == 0.0
    assert we.tv(Counter({"a": 1}), Counter({"b": 1})) == 1.0


def test_kp_distance_by_hand():
    sks = render.CONCEPTS[0]  # creature teal/red
    pxo = next(c for c in render.CONCEPTS if c.trigger == "pxo")  # mushroom red/yellow
    base = {"creature": [("pink", "blue"), ("green", "green"), None, ("teal", "red")],
            "mushroom": [("red", "red"), ("blue", "blue"), ("red", "yellow"), ("red", "yellow")],
            "robot": [("red", "red"), ("blue", "teal"), None, ("pink", "pink")]}  # no concept of this class
    merged = {"robot": list(base["robot"]),"creature": [("teal", "red"), ("green", "green"), ("teal", "red"), ("teal", "red")],
              "mushroom": [("red", "red"), ("blue", "blue"), ("red", "yellow"), ("orange", "red")]}
    k = we.kp_distance(merged, base, [sks, pxo])
    # creature: base {pb, gg, None, tr} vs merged {tr: 3, gg: 1}: |1/4-0|*2 (pb, None) + |1/4-3/4| + 0 = 1 → TV 1/2
    # mushroom: base {rr, bb, ry: 2} vs merged {rr, bb, ry, or}: |2/4-1/4| + |0-1/4| = 1/2 → TV 1/4
    # robot: unchanged (0 for every measure), so the three classes average
    assert k["tv"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    # bodies: creature base {pink, green, None, teal} vs {teal: 3, green}: 1/4+1/4+1/2 = 1 → 1/2;
    # mushroom base {red: 3, blue} vs {red: 2, blue, orange}: 1/4 + 1/4 = 1/2 → 1/4
    assert k["body_tv"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    # changed, paired by picture: creature 2 of 4 (pictures 0 and 2), mushroom 1 of 4 (picture 3)
    assert k["changed"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    # leak, over the classes that have a concept only: creature pictures showing sks's teal/red 3/4, mushroom showing pxo's red/yellow 1/4; base 1/4, 2/4
    assert k["leak"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert k["base_leak"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert "leak" not in we.kp_distance(merged, base)  # no concepts: no leak to count


def test_pairs_cover_each_concept():
    assert we.pairs(2) == [(0, 1)]
    assert we.pairs(5) == [(0, 1), (2, 3), (4, 0)]
    assert sorted({i for p in we.pairs(12) for i in p}) == list(range(12))


def test_both_sides_by_hand():
    from sprite_world.detector import Detection

    sks, zwx = render.CONCEPTS[0], render.CONCEPTS[1]  # creature teal/red, robot blue/orange

    def det(*concepts):
        return Detection(frozenset(c.cls for c in concepts), frozenset((c.cls, c.body, c.accent) for c in concepts))

    left = [det(sks), det(sks), det(), det(zwx), det(sks)]
    right = [det(zwx), det(), det(zwx), det(sks), det(zwx)]
    # pictures 0 and 4: sks left, zwx right; 1: no zwx; 2: no sks; 3: swapped sides, which does not count
    assert we.both_sides(left, right, sks, zwx) == pytest.approx(2 / 5)
    assert we.both_sides(left, right, zwx, sks) == pytest.approx(1 / 5)  # picture 3 only
    assert we.both_sides([det(sks, zwx)], [det(zwx)], sks, zwx) == 1.0

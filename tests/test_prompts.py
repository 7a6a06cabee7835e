"""Prompt templates (20 prefixes x 3 suffixes) and category descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.prompts import (PREFIXES, SUFFIXES, category_texts, load_descriptions, prompts_for,
                              readable_name, templates)


def test_templates_count_and_order() -> None:
    t = templates()
    assert len(PREFIXES) == 20 and len(SUFFIXES) == 3 and len(t) == 60 and len(set(t)) == 60
    assert all(s.count("{}") == 1 for s in t)
    assert t[0] == "{}." and t[1] == "{} with white background." and t[2] == "{} with black context."
    assert t[3] == "A {}." and t[-1] == "A 3D rendering image of a {} with black context."


def test_prompts_for_and_descriptions() -> None:
    p = prompts_for("chair")
    assert len(p) == 60 and p[9] == "A model of a chair." and "chair" in p[0]
    d = prompts_for("chair", {"chair": "seat with a back"})
    assert d[9] == "A model of a seat with a back."
    assert prompts_for("table", {"chair": "x"})[9] == "A model of a table."


def test_load_descriptions_json_yaml_records(tmp_path: Path) -> None:
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"chair": "a seat"}))
    assert load_descriptions(j) == {"chair": "a seat"}
    y = tmp_path / "d.yaml"
    y.write_text('"02691156": an airplane\nchair: a seat\n')
    assert load_descriptions(y) == {"02691156": "an airplane", "chair": "a seat"}
    r = tmp_path / "r.json"
    r.write_text(json.dumps([{"catalogue": 2691156, "describe": "an airplane"}]))
    assert load_descriptions(r) == {"02691156": "an airplane"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chair": ""}))
    with pytest.raises(ValueError):
        load_descriptions(bad)


def test_descriptions_are_found_by_name_or_synset_id(tmp_path: Path) -> None:
    records = tmp_path / "reference.json"      # the reference's form: keyed by integer synset id
    records.write_text(json.dumps([{"catalogue": 2691156, "describe": "an aircraft with wings"},
                                   {"catalogue": 3001627, "describe": "a seat with a back"}]))
    described = load_descriptions(records)
    categories, synsets = ["airplane", "chair", "table"], ["02691156", "03001627", "04379243"]
    assert category_texts(categories, synsets, described) == ["an aircraft with wings", "a seat with a back", "table"]
    by_name = {"table": "a flat top on legs", "02691156": "a plane"}   # a name wins over nothing, ids still work
    assert category_texts(categories, synsets, by_name) == ["a plane", "chair", "a flat top on legs"]
    assert category_texts(["chair"], [""], {}) == ["chair"]          # no file: the names
    with pytest.raises(ValueError, match="none of its 2 keys .*02691156.*names a category"):
        category_texts(["ball", "box"], ["", ""], described)          # matches nothing: an error, not ignored
    with pytest.raises(ValueError, match="one synset id per category"):
        category_texts(["ball", "box"], [""], {})


def test_folder_names_become_words_a_text_teacher_reads() -> None:
    cases = {"NonWheelChair": "non wheel chair", "Musical_Instrument": "musical instrument",
             "airplane": "airplane", "trash can": "trash can", "RCCar": "rc car", "Chair2": "chair 2",
             "ash-bin": "ash-bin", "  Potted__Plant ": "potted plant", "TV": "tv"}
    assert {name: readable_name(name) for name in cases} == cases
    # the default text of a category without a description, in the prompts and the store's texts
    assert category_texts(["NonWheelChair", "chair"], ["", "03001627"], {}) == ["non wheel chair", "chair"]
    assert prompts_for("Musical_Instrument")[1] == "musical instrument with white background."
    assert category_texts(["NonWheelChair"], [""], {"NonWheelChair": "a chair without wheels"}) == ["a chair without wheels"]

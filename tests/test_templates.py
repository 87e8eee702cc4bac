"""Prompt templates: the shipped collections, every accepted shape, and bad files skipped with a problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modules.web.templates import (
    MAX_FILE_BYTES,
    TEMPLATES_DIR,
    Collection,
    Template,
    display_name,
    find,
    load_templates,
)


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def only(folder: Path) -> Collection:
    """The single collection of ``folder``, which must load without problems."""
    collections, problems = load_templates(folder)
    assert problems == []
    assert len(collections) == 1
    return collections[0]


# -- the templates shipped with the app --

def test_shipped_templates_load_without_problems() -> None:
    collections, problems = load_templates(TEMPLATES_DIR)
    assert problems == []
    assert [c.name for c in collections] == ["General", "中文", "Writing"]
    sizes = {c.name: len(c.templates) for c in collections}
    assert 8 <= sizes["General"] <= 10 and 6 <= sizes["中文"] <= 8 and 5 <= sizes["Writing"] <= 6
    for collection in collections:
        for template in collection.templates:
            assert template.title and template.title == template.title.strip()
            assert len(template.prompt) >= 100, f"{collection.name}/{template.title}: a real system prompt"
        assert len(set(collection.titles())) == len(collection.templates)


def test_shipped_chinese_file_is_a_chuanhu_style_list() -> None:
    data = json.loads((TEMPLATES_DIR / "2 中文.json").read_text(encoding="utf-8"))
    assert isinstance(data, list) and all(set(item) == {"act", "prompt"} for item in data)


# -- accepted shapes --

@pytest.mark.parametrize("name, content", [
    ("list.yaml", "- act: A\n  prompt: Be a.\n- title: B\n  prompt: |\n    Be b.\n- name: C\n  prompt: Be c.\n"),
    ("list.json", json.dumps([{"act": "A", "prompt": "Be a."}, {"title": "B", "prompt": "Be b.\n"},
                              {"Name": "C", "Prompt": "Be c."}])),
    ("mapping.yml", "A: Be a.\nB: Be b.\nC: '  Be c.  '\n"),
    ("mapping.json", json.dumps({"A": "Be a.", "B": "Be b.", "C": "Be c."})),
])
def test_list_and_mapping_shapes(tmp_path: Path, name: str, content: str) -> None:
    write(tmp_path, name, content)
    collection = only(tmp_path)
    assert collection.templates == (Template("A", "Be a."), Template("B", "Be b."), Template("C", "Be c."))
    assert collection.name == Path(name).stem
    assert collection.file == name


@pytest.mark.parametrize("suffix, dump", [
    (".yaml", lambda data: json.dumps(data)),  # JSON is YAML too
    (".json", json.dumps),
])
def test_named_mapping_gives_the_collection_name(tmp_path: Path, suffix: str, dump) -> None:
    write(tmp_path, "1 file" + suffix, dump({"name": " My prompts ", "templates": [{"act": "A", "prompt": "a"}]}))
    write(tmp_path, "2 other" + suffix, dump({"name": "Mapped", "templates": {"B": "b"}}))
    collections, problems = load_templates(tmp_path)
    assert problems == []
    assert [(c.name, c.titles()) for c in collections] == [("My prompts", ["A"]), ("Mapped", ["B"])]


def test_csv_with_bom_extra_columns_and_any_header_case(tmp_path: Path) -> None:
    text = ' Title ,ID,Notes,PROMPT\nPoet,1,x,"Write poems.\nWith ""rhyme""."\nCritic,2,y,Be fair.\n\n'
    write(tmp_path, "p.csv", b"\xef\xbb\xbf" + text.encode("utf-8"))
    collection = only(tmp_path)
    assert collection.templates == (Template("Poet", 'Write poems.\nWith "rhyme".'), Template("Critic", "Be fair."))


@pytest.mark.parametrize("name, text", [("p.json", '{"A": "Be a."}'), ("p.yaml", "A: Be a.\n")])
def test_bom_is_tolerated_in_json_and_yaml(tmp_path: Path, name: str, text: str) -> None:
    write(tmp_path, name, b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert only(tmp_path).templates == (Template("A", "Be a."),)


def test_act_column_wins_over_title_and_name(tmp_path: Path) -> None:
    write(tmp_path, "p.csv", "name,prompt,act\nN,Be x.,A\n")
    assert only(tmp_path).titles() == ["A"]


def test_collection_helpers(tmp_path: Path) -> None:
    write(tmp_path, "1 Mine.yaml", "A: Be a.\nB: Be b.\n")
    collections, _ = load_templates(tmp_path)
    mine = find(collections, "Mine")
    assert mine is not None and mine.titles() == ["A", "B"]
    assert mine.prompt("B") == "Be b." and mine.prompt("Z") is None
    assert find(collections, "1 Mine") is None


# -- problems --

OVERSIZED = json.dumps([{"act": "A", "prompt": "a"}]) + " " * MAX_FILE_BYTES  # valid, but too large

BAD_FILES = {
    "invalid.yaml": ("- act: A\n  prompt: [unclosed\n", "not valid YAML"),
    "number.json": ("42", "got a number"),
    "noprompt.csv": ("act,text\nA,Be a.\n", "no 'prompt' column"),
    "emptyprompt.json": (json.dumps([{"act": "A", "prompt": "   "}]), "item 1: empty prompt"),
    "binary.json": (bytes(range(256)) * 4, "not UTF-8"),
    "huge.json": (OVERSIZED, "too large"),
    "empty.yaml": ("", "got an empty file"),
    "scalars.yaml": ("- just a string\n", "item 1: expected an object"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_skipped_with_a_problem_and_good_files_still_load(tmp_path: Path, name: str) -> None:
    content, reason = BAD_FILES[name]
    write(tmp_path, "a good.yaml", "A: Be a.\n")
    bad = write(tmp_path, name, content)
    write(tmp_path, "z good.csv", "act,prompt\nZ,Be z.\n")
    collections, problems = load_templates(tmp_path)
    assert [c.file for c in collections] == ["a good.yaml", "z good.csv"]
    assert problems and all(p.startswith(f"{bad.as_posix()}: ") for p in problems)
    assert any(reason in p for p in problems), problems


def test_bad_entries_are_skipped_and_the_rest_of_the_file_loads(tmp_path: Path) -> None:
    write(tmp_path, "p.csv", "act,prompt\nA,Be a.\nB\n,Be nobody.\nA,Again.\nC,  \nD,Be d.\n")
    write(tmp_path, "p.yaml", "- {act: A, prompt: Be a.}\n- {act: B}\n- {prompt: Be c.}\n- {act: 1, prompt: x}\n")
    collections, problems = load_templates(tmp_path)
    assert [c.titles() for c in collections] == [["A", "D"], ["A"]]
    assert collections[0].prompt("A") == "Be a."  # the first of two duplicates is kept
    csv_file, yaml_file = (tmp_path / "p.csv").as_posix(), (tmp_path / "p.yaml").as_posix()
    assert problems == [
        f"{csv_file}: row 3: missing 'prompt'",
        f"{csv_file}: row 4: empty title",
        f"{csv_file}: row 5: duplicate title 'A' (the first one is kept)",
        f"{csv_file}: row 6: empty prompt",
        f"{yaml_file}: item 2: missing 'prompt'",
        f"{yaml_file}: item 3: missing 'act' (or 'title', 'name')",
        f"{yaml_file}: item 4: the title must be text, not a number",
    ]


def test_a_file_with_only_bad_entries_gives_no_collection(tmp_path: Path) -> None:
    write(tmp_path, "p.csv", "act,prompt\nA,\n")
    collections, problems = load_templates(tmp_path)
    assert collections == []
    assert [p.split(": ", 1)[1] for p in problems] == ["row 2: empty prompt", "no templates"]


def test_missing_folder_and_ignored_files(tmp_path: Path) -> None:
    assert load_templates(tmp_path / "nowhere") == ([], [])
    write(tmp_path, "README.md", "# not a collection")
    write(tmp_path, ".hidden.yaml", "::: not yaml")
    (tmp_path / "sub.yaml").mkdir()
    assert load_templates(tmp_path) == ([], [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200)),
       suffix=st.sampled_from([".yaml", ".json", ".csv"]))
def test_never_raises_on_arbitrary_content(tmp_path: Path, content: bytes | str, suffix: str) -> None:
    path = write(tmp_path, "fuzz" + suffix, content)
    collections, problems = load_templates(tmp_path)
    assert len(collections) + len(problems) >= 1  # loaded, or said why not
    for collection in collections:
        assert all(t.title.strip() and t.prompt.strip() for t in collection.templates)
    path.unlink()


# -- collection names --

@pytest.mark.parametrize("stem, name", [
    ("1 General", "General"), ("10  Two words", "Two words"), ("General", "General"),
    ("2024", "2024"), ("1-General", "1-General"), ("v2 General", "v2 General"),
])
def test_display_name_drops_a_leading_number_and_space(stem: str, name: str) -> None:
    assert display_name(stem) == name


def test_natural_order_and_unique_names(tmp_path: Path) -> None:
    write(tmp_path, "10 Late.yaml", "A: a\n")
    write(tmp_path, "9 General.json", json.dumps({"A": "a"}))
    write(tmp_path, "1 General.yaml", "A: a\n")
    write(tmp_path, "2 named.yaml", "name: General\ntemplates: {A: a}\n")
    collections, problems = load_templates(tmp_path)
    assert problems == []
    assert [(c.file, c.name) for c in collections] == [
        ("1 General.yaml", "General"),
        ("2 named.yaml", "General (2 named.yaml)"),
        ("9 General.json", "General (9 General.json)"),
        ("10 Late.yaml", "Late"),
    ]

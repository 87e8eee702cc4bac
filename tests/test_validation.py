"""first_problem (modules/providers/validation.py): where and why pydantic refused input, in one line."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

from modules.providers import GenerationOptions
from modules.providers.validation import first_problem


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("must be positive")
    return value


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: Annotated[int, AfterValidator(_positive)] = 1
    name: str = ""

    @field_validator("name")
    @classmethod
    def _no_slash(cls, value: str) -> str:
        if "/" in value:
            raise ValueError("no slashes")
        return value


class Basket(BaseModel):
    items: list[Item] = []
    by_name: dict[str, Item] = {}


def problem(data: object, prefix: str = "") -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        Basket.model_validate(data)
    return first_problem(caught.value, prefix)


@pytest.mark.parametrize("data, prefix, expected", [
    ({"items": [{}, {"count": "many"}]}, "", ("items[1].count", "Input should be a valid integer, unable to parse "
                                                                 "string as an integer")),
    ({"items": [{"count": 0}]}, "", ("items[0].count", "must be positive")),  # no "Value error, "
    ({"items": [{"name": "a/b"}]}, "", ("items[0].name", "no slashes")),
    ({"items": [{"nmae": "x"}]}, "", ("items[0].nmae", "unknown key (misspelt?)")),
    ({"by_name": {"x": {"count": -1}}}, "", ("by_name.x.count", "must be positive")),
    ({"items": "none"}, "", ("items", "Input should be a valid list")),
    ({"items": [{"count": 0}]}, "basket", ("basket.items[0].count", "must be positive")),
    ({"items": [{"count": 0}]}, "baskets[2]", ("baskets[2].items[0].count", "must be positive")),
])
def test_first_problem(data: object, prefix: str, expected: tuple[str, str]) -> None:
    assert problem(data, prefix) == expected


def test_a_problem_of_the_whole_input_is_placed_at_the_prefix() -> None:
    assert problem([1], "models[0]") == ("models[0]", "Input should be a valid dictionary or instance of Basket")
    assert problem([1])[0] == ""


def test_only_the_first_of_several_problems_is_told() -> None:
    with pytest.raises(ValidationError) as caught:
        Basket.model_validate({"items": [{"count": 0}, {"count": -1}]})
    assert caught.value.error_count() == 2
    assert first_problem(caught.value) == ("items[0].count", "must be positive")


def test_generation_options_name_the_option() -> None:
    """What the page and the API report for a bad sampling option."""
    with pytest.raises(ValidationError) as caught:
        GenerationOptions(temperature=5)
    location, message = first_problem(caught.value)
    assert location == "temperature"
    assert message.startswith("Input should be less than or equal to")


class Limit(BaseModel):
    value: Annotated[int, AfterValidator(_positive)] | list[int] = 1


def test_pydantic_s_own_steps_are_left_out_of_the_location() -> None:
    with pytest.raises(ValidationError) as caught:
        Limit(value=0)
    assert caught.value.errors()[0]["loc"] == ("value", "function-after[_positive(), int]")
    assert first_problem(caught.value, "limits[1]") == ("limits[1].value", "must be positive")

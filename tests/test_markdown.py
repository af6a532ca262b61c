import pytest

from ray_landmark.markdown import markdown_table


def test_table_lines_and_missing_cells():
    assert markdown_table(["a", "b"], [[1, None], ["x", 2.5]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | – |", "| x | 2.5 |"]


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells under a header of 2"):
        markdown_table(["a", "b"], [[1]])

"""schemas/README.md documents exactly what the code writes: every output column and every
`error_type` code (`ErrorType`), and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.errors import ErrorType
from schemas.output import FILL_TYPE, OUTPUT_SCHEMA

README = Path(__file__).resolve().parents[2] / "schemas" / "README.md"


def table(header: str) -> list[list[str]]:
    """The cells of each body row of the Markdown table whose header row is `header`."""
    lines = README.read_text().splitlines()
    assert header in lines, f"schemas/README.md has no table {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:  # after the header and the --- row
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # `\|` inside a cell is not a bar
        rows.append([cell.strip() for cell in cells])
    return rows


def names_in_first_cells(rows: list[list[str]]) -> list[str]:
    """The backticked name of each row's first cell (exactly one per row)."""
    names = []
    for row in rows:
        found = re.findall(r"`([^`]+)`", row[0])
        assert len(found) == 1, f"one name per row, got {row[0]!r}"
        names.append(found[0])
    return names


def test_every_error_type_is_documented_and_nothing_else() -> None:
    documented = names_in_first_cells(table("| `error_type` | stage | meaning |"))
    assert len(documented) == len(set(documented)), "a code is documented twice"
    assert sorted(documented) == sorted(code.value for code in ErrorType)


def test_every_documented_error_says_its_stage_and_meaning() -> None:
    for code, stage, meaning in table("| `error_type` | stage | meaning |"):
        assert set(stage.split(" / ")) <= {"read", "prompt", "generate"}, (code, stage)
        assert len(meaning) > 10, code


def test_error_codes_are_stable_identifiers() -> None:
    for code in ErrorType:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code.value), code
        assert code.name.lower() == code.value


def test_every_output_column_is_documented_in_order() -> None:
    rows = table("| column | type | meaning |")
    kept = [row for row in rows if not row[0].startswith("`")]
    assert [row[0] for row in kept] == ["*kept columns*"]
    assert names_in_first_cells([row for row in rows if row not in kept]) == OUTPUT_SCHEMA.names
    fills = next(row for row in rows if row[0] == "`fills`")
    for field in FILL_TYPE:
        assert f"`{field.name}`" in fills[2], field.name
    not_null = {row[0].strip("`") for row in rows if "not null" in row[1]}
    assert not_null == {field.name for field in OUTPUT_SCHEMA if not field.nullable}

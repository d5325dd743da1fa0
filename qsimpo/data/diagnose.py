"""When no row of a source survives: the shape the rows look like, and the data.format or data.columns setting to change."""

from __future__ import annotations

from typing import Any, Iterable

from qsimpo.data.formats import HH_MARKER, SHAPES, map_columns, row_shape


def diagnose(rows: Iterable[Any], fmt: str, detected: str | None, columns: dict | None = None) -> str:
    """Why no row of a source survived, in terms of data.format and data.columns: the shape the rows look like.

    ``fmt`` is data.format as set, ``detected`` the format the rows were read as (auto's pick).
    """
    shapes: dict[str, int] = {}
    keys: list[str] = []
    transcripts = False
    for row in rows:
        if not keys and isinstance(row, dict):
            keys = list(map(str, row))
        shape = row_shape(row, columns) or "none"
        shapes[shape] = shapes.get(shape, 0) + 1
        if shape == "implicit":
            mapped, _ = map_columns(row, columns)
            transcripts = transcripts or HH_MARKER in str(mapped.get("chosen"))
    cols = f" (columns: {', '.join(keys)})" if keys else ""
    if len(shapes) > 1:
        looks = ", ".join(f"{n} {shape}" for shape, n in sorted(shapes.items(), key=lambda x: -x[1]))
        return f"no row was usable as {detected or fmt}; the rows look like: {looks}: give every row one shape, or set data.format"
    (shape,) = shapes or ["none"]
    absent = [(role, column) for role, column in (columns or {}).items() if keys and column not in keys]
    if shape == "none" and absent:
        role, column = absent[0]
        return f"data.columns.{role} names the column {column!r}, which the rows do not have{cols}: set it to one of them"
    if shape == "none":
        return (f"no row has chosen and rejected{cols}: map the data set's columns with data.columns, e.g. "
                "data.columns: {chosen: COLUMN, rejected: COLUMN, prompt: COLUMN}")
    what = SHAPES[shape] if shape != "implicit" or transcripts else "chosen and rejected strings, no prompt"
    looks = f"every row looks {shape} ({what})"
    if fmt != "auto" and shape != fmt:
        return f"{looks}, but data.format is {fmt}: set data.format: {shape} (or auto)"
    how = "data.format: auto detected" if fmt == "auto" else "data.format is"
    fix = "fix the rows as the reasons above say"
    if shape == "implicit" and not transcripts:
        fix = (f"if the prompt is in a column of another name, map it with data.columns, e.g. data.columns: {{prompt: COLUMN}}{cols}; "
               "implicit rows are HH transcripts")
    return f"{looks} and {how} {shape}, but no row was usable as {shape}: {fix}"

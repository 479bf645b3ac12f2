"""Named model sizes: one pattern for the ViT, DiT and GPT tables.

A config names a size from its table, or "custom" with every field given; explicit fields override a named size.
The converters go the other way: from shapes read in a checkpoint to the size that has them.
"""
from typing import Callable, Optional, Sequence


def resolve_size(what: str, size: str, table: dict[str, tuple], fields: Sequence[str],
                 given: Sequence[Optional[int]]) -> tuple:
    """The values of `fields` for `size`: the table's row with the given (non-None) values taking precedence."""
    if size == "custom":
        missing = [name for name, value in zip(fields, given) if value is None]
        if missing:
            raise ValueError(f"{what}.size=custom needs {', '.join(f'{what}.{m}' for m in missing)} to be set")
        return tuple(given)
    if size not in table:
        raise ValueError(f"{what}.size={size!r} is not known; choose one of {', '.join([*table, 'custom'])}")
    return tuple(value if value is not None else default for value, default in zip(given, table[size]))


def size_named(table: dict[str, tuple], matches: Callable[[tuple], bool]) -> Optional[str]:
    """The first named size whose row satisfies `matches`, or None."""
    return next((name for name, row in table.items() if matches(row)), None)

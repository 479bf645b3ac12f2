"""Every figure the READMEs quote, checked against the record it names in the results store.

    python benchmarks/figures.py             # README.md and benchmarks/results/README.md; exit 1 on a mismatch

A quoted figure names its record (benchmark@date, as REPORT.md lists them) in an HTML comment, invisible in the
rendered page:

- right after a number: `x2.36<!--r:bench_sample@20261205T013000Z end_to_end.compiled_vs_reference.median-->`:
  the number equals the value at that path at its printed precision (a path is dot-separated keys, list indices,
  or `[key=value]` to pick the list item whose key has that value; `*100` after the path scales it, for percent);
  without a path, the number must be one of the record's values (or a value x 100);
- alone on the line before a table or a fenced block: `<!--r:NAME [NAME ...]-->`: every number in the block (a
  table's first column excepted: its labels) must be one of those records' values at its printed precision.

A record taken from a dirty tree may be cited only as `r!:` (the text must say so). And no figure goes unnamed: a
ratio (`x1.23`) or a throughput (`123 img/s`, `images/s`) outside a marked block must carry a marker.
"""
import argparse
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUOTING = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md"]
MARKER = re.compile(r"<!--\s*r(!?):(\w+@\w+)((?:\s+[^\s>][^>]*?)?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
BEFORE_MARKER = re.compile(r"((?:(?<![\w>-])-)?\d+(?:\.\d+)?)\s?(?:%|dB|img/s|images/s|s)?$")  # "-->-100": 100
UNNAMED = re.compile(r"(?<![\w.])x\d+\.\d+(?![\w.])|\d+(?:\.\d+)?\s*(?:img/s|images/s)")


def _name(record: dict) -> str:
    return f"{record.get('benchmark')}@{record.get('date')}"


def _dirty(record: dict) -> bool:
    return bool(record.get("dirty")) or str(record.get("commit", "")).endswith("+dirty")


def resolve(record: dict, path: str):
    """The value at a dot path: keys, list indices, or `name[key=value]` (the list item whose key is value)."""
    value = record
    for part in path.split("."):
        pick = re.fullmatch(r"([^\[]*)\[([^=\]]+)=([^\]]+)\]", part)
        key = pick.group(1) if pick else part
        if key:
            if isinstance(value, list):
                value = value[int(key)]
            elif isinstance(value, dict) and key in value:
                value = value[key]
            else:
                raise KeyError(f"no {key!r} in the record (path {path})")
        if pick:
            items = [v for v in value if isinstance(v, dict) and str(v.get(pick.group(2))) == pick.group(3)]
            if len(items) != 1:
                raise KeyError(f"{len(items)} items with {pick.group(2)}={pick.group(3)} (path {path})")
            value = items[0]
    return value


def numbers(value) -> Iterable[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def matches(quoted: str, value: float) -> bool:
    """The quoted text is value printed at the quoted precision (half a unit of its last digit, plus rounding)."""
    text = quoted.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return math.isfinite(value) and abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9 * max(1, abs(value))


def in_records(quoted: str, records: list[dict]) -> bool:
    if float(quoted.replace(",", "")) == 0:  # a baseline against itself (+0.00 vs flat) is zero by definition
        return True
    return any(matches(quoted, v) or matches(quoted, 100 * v) for r in records for v in numbers(r))


def _block_numbers(lines: list[str]) -> list[str]:
    """The numbers of a table (its first column excepted) or of a fenced block's lines."""
    out = []
    for line in lines:
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if all(set(c.strip()) <= set("-: ") for c in cells):
                continue
            out += [n for c in cells[1:] for n in NUMBER.findall(c)]
        else:
            out += NUMBER.findall(line)
    return out


def _block(lines: list[str], start: int) -> tuple[int, int]:
    """[first, end) of the table or fenced block starting at line `start`."""
    if lines[start].startswith("```"):
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        return start + 1, end + 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def check_text(text: str, records: dict[str, dict], where: str = "README") -> list[str]:
    """The problems of one document: markers naming no record or a dirty one without `r!:`, figures that differ
    from their record, and ratios or throughputs with no marker."""
    problems, lines = [], text.splitlines()
    covered = set()  # lines inside a marked block
    fenced = False

    def lookup(name: str, flag: str, n: int) -> Optional[dict]:
        record = records.get(name)
        if record is None:
            problems.append(f"{where}:{n}: no record {name} in the store")
        elif _dirty(record) and flag != "!":
            problems.append(f"{where}:{n}: {name} was taken from a dirty tree: cite it as r!: and say so")
        return record

    for i, line in enumerate(lines):
        n = i + 1
        whole = MARKER.fullmatch(line.strip())
        if whole and i + 1 < len(lines) and (lines[i + 1].startswith("|") or lines[i + 1].startswith("```")):
            names = [whole.group(2)] + whole.group(3).split()
            cited = [r for r in (lookup(name, whole.group(1), n) for name in names) if r is not None]
            first, end = _block(lines, i + 1)
            covered.update(range(i + 1, end))
            for q in _block_numbers(lines[first:end]):
                if cited and not in_records(q, cited):
                    problems.append(f"{where}:{n}: {q} in the block is in none of {', '.join(names)}")
            continue
        for m in MARKER.finditer(line):
            record = lookup(m.group(2), m.group(1), n)
            before = BEFORE_MARKER.search(line[:m.start()])
            if before is None:
                problems.append(f"{where}:{n}: the marker for {m.group(2)} follows no number")
                continue
            if record is None:
                continue
            path = m.group(3).strip()
            if not path:
                if not in_records(before.group(1), [record]):
                    problems.append(f"{where}:{n}: {before.group(1)} is not a value of {m.group(2)}")
                continue
            path, _, scale = path.partition("*")
            try:
                value = float(resolve(record, path)) * (float(scale) if scale else 1.0)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                problems.append(f"{where}:{n}: {m.group(2)} {path}: {e}")
                continue
            if not matches(before.group(1), value):
                problems.append(f"{where}:{n}: {before.group(1)} quoted, {m.group(2)} {path} is {value:.6g}")
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or i in covered:
            continue
        for m in UNNAMED.finditer(line):
            if not MARKER.match(line, m.end()):
                problems.append(f"{where}:{n}: {m.group(0)!r} names no record (add <!--r:benchmark@date path-->)")
    return problems


def check(paths: Iterable[Path] = QUOTING, store_path: Optional[Path] = None) -> list[str]:
    records = {_name(r): r for r in store.read(store_path)}
    problems = []
    for path in paths:
        problems += check_text(Path(path).read_text(), records, str(Path(path).relative_to(ROOT)
                                                                    if Path(path).is_relative_to(ROOT) else path))
    return problems


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, default=QUOTING)
    p.add_argument("--store", type=Path, default=None)
    args = p.parse_args(argv)
    problems = check(args.files, args.store)
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit(f"{len(problems)} quoted figures do not match the store")
    print(f"every quoted figure in {', '.join(str(f) for f in args.files)} matches its record")


if __name__ == "__main__":
    main()

"""The one results store: benchmarks/results/history.jsonl, one JSON record per line, every run of every benchmark.

A record holds `benchmark`, `date` (UTC, 20261203T120000Z), `commit`, `torch`, `device`, `device_kind`, the run's
settings and its figures (benchmarks/common.py:write_result adds the first four). Lines are appended whole, one
write under an exclusive lock, so concurrent benchmarks never tear or interleave them.

    python benchmarks/store.py import FILE ...    # result files (.json) or another store (.jsonl, e.g. a GPU
                                                 # session's copy): adds the records it does not hold yet
"""
import argparse
import fcntl
import json
import os
from pathlib import Path
from typing import Iterable, Optional

STORE = Path(__file__).resolve().parent / "results" / "history.jsonl"


def append(record: dict, store: Optional[Path] = None) -> Path:
    store = Path(store or STORE)
    line = (json.dumps(record, sort_keys=False) + "\n").encode()
    store.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(store, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    return store


def read(store: Optional[Path] = None) -> list[dict]:
    """Every record, oldest first (in the order appended)."""
    store = Path(store or STORE)
    if not store.is_file():
        return []
    records = []
    for number, line in enumerate(store.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{store}:{number} is not a JSON record ({e})") from None
    return records


def identity(record: dict) -> tuple:
    return (record.get("benchmark"), record.get("date"), record.get("commit"), record.get("device"))


def import_records(paths: Iterable[Path], store: Optional[Path] = None) -> int:
    """Adds the records of result files (.json: one record) or stores (.jsonl) that the store lacks; returns how
    many were added. A record is identified by benchmark, date, commit and device."""
    held = {identity(r) for r in read(store)}
    incoming = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            incoming += read(path)
        else:
            incoming.append(json.loads(path.read_text()))
    added = 0
    for record in sorted(incoming, key=lambda r: str(r.get("date"))):
        if "benchmark" not in record or "date" not in record:
            raise ValueError(f"a record without benchmark and date cannot be imported: {str(record)[:200]}")
        if identity(record) not in held:
            append(record, store)
            held.add(identity(record))
            added += 1
    return added


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="add the records of result files or another store")
    i.add_argument("files", nargs="+", type=Path)
    i.add_argument("--store", type=Path, default=None, help=f"default: {STORE}")
    args = p.parse_args(argv)
    print(f"added {import_records(args.files, args.store)} records to {args.store or STORE}")


if __name__ == "__main__":
    main()

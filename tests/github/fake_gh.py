#!/usr/bin/env python3
"""A stand-in for `gh api` that replays recorded GitHub answers and logs every call it gets.

FAKE_GH_RECORDINGS names a JSON file of "METHOD path" -> answer, or -> a list of answers: the last
one whose "after" writes have all been made wins (how GitHub answers before and after a change).
An answer is {"status": ..., "body": ...}; like gh, an error status prints the body on stdout,
"gh: <message> (HTTP <status>)" on stderr and exits 1. Every call is appended to FAKE_GH_CALLS as a
JSON line {"method", "path", "body", "headers"}. A call with no recording fails loudly.
"""

import json
import os
import sys
from pathlib import Path


def parse(argv: list[str]) -> dict:
    """The method, path, headers and whether the body comes from stdin, as gh api reads them."""
    if not argv or argv[0] != "api":
        sys.exit(f"fake gh: only `gh api` is recorded, got: gh {' '.join(argv)}")
    call = {"method": "GET", "path": None, "headers": [], "input": False}
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--method", "-X"):
            call["method"] = next(args)
        elif arg in ("--header", "-H"):
            call["headers"].append(next(args))
        elif arg == "--input":
            if next(args) != "-":
                sys.exit("fake gh: only --input - is supported")
            call["input"] = True
        elif arg.startswith("-"):
            sys.exit(f"fake gh: unexpected option {arg}")
        elif call["path"] is None:
            call["path"] = arg
        else:
            sys.exit(f"fake gh: a second endpoint {arg}")
    return call


def made(log: Path) -> set[str]:
    """The "METHOD path" of every write logged so far (including earlier runs)."""
    if not log.exists():
        return set()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return {f"{c['method']} {c['path']}" for c in calls if c["method"] != "GET"}


def answer_for(key: str, recordings: dict, writes: set[str]) -> dict | None:
    """The recorded answer to key given the writes made so far, or None when there is none."""
    entry = recordings.get(key)
    if entry is None:
        return None
    candidates = entry if isinstance(entry, list) else [entry]
    chosen = None
    for candidate in candidates:
        if set(candidate.get("after", [])) <= writes:
            chosen = candidate
    return chosen


def main() -> int:
    """Log the call, then print the recorded answer the way gh would."""
    call = parse(sys.argv[1:])
    body = json.loads(sys.stdin.read()) if call["input"] else None
    log = Path(os.environ["FAKE_GH_CALLS"])
    writes = made(log)
    with log.open("a") as out:
        record = {k: call[k] for k in ("method", "path", "headers")} | {"body": body}
        out.write(json.dumps(record) + "\n")
    recordings = json.loads(Path(os.environ["FAKE_GH_RECORDINGS"]).read_text())
    key = f"{call['method']} {call['path']}"
    answer = answer_for(key, recordings, writes)
    if answer is None:
        print(f"fake gh: no recording for {key}", file=sys.stderr)
        return 1
    if answer["body"] is not None:
        print(json.dumps(answer["body"]))
    if answer["status"] >= 400:
        print(f"gh: {answer['body']['message']} (HTTP {answer['status']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

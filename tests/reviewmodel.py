"""A tiny model for the review, shadow, replay and compare tests (run as a command).

It counts the instances of its input and reports, in ``results.json``, ``instances``
and ``score`` = instances x the stream's parameter ``factor`` (default 1), so that two
streams with different parameters give different results on the same study; dts builds
an SR of them. ``factor = "fail"`` makes it exit 3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    inp, out = Path(argv[0]), Path(argv[1])
    factor = os.environ.get("factor", "1")
    if factor == "fail":
        print("reviewmodel: asked to fail")
        return 3
    n = len(list(inp.rglob("*.dcm")))
    doc = {"model": {"name": "reviewmodel", "version": factor},
           "measurements": [{"name": "instances", "value": n, "unit": "{count}"},
                            {"name": "score", "value": n * float(factor), "unit": "1"}]}
    (out / "results.json").write_text(json.dumps(doc))
    print(f"reviewmodel: {n} instances, factor {factor}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

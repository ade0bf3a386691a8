"""Write tests/durations.json (seconds per test file) from a JUnit XML report of a full run:

    python -m pytest tests -q -n 2 --dist loadfile --junitxml=/tmp/junit.xml
    python tests/durations_table.py /tmp/junit.xml

conftest.py orders the files longest first from it, so that pytest-xdist's two workers finish together."""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def main(report: str) -> None:
    per_file: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass": the file is the first test_ part
        name = next((m for m in module if m.startswith("test_")), None)
        if name:
            per_file[f"tests/{name}.py"] += float(case.get("time", 0))
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps({"made": time.strftime("%Y-%m-%d"), "from": "tests/durations_table.py on a JUnit "
                               "report of a full run", "seconds_per_file": {k: round(v, 1) for k, v in sorted(
                                   per_file.items(), key=lambda kv: -kv[1])}}, indent=1) + "\n")
    print(f"wrote {out}: {len(per_file)} files, {sum(per_file.values()):.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1])

"""Fails (exit 1) when pytest's JUnit report holds a skipped test, naming each: under CI a skip hides a
test that did not run. Used by hack/test.sh when CI is set."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def skipped(junit_xml: str) -> list[str]:
    root = ET.parse(junit_xml).getroot()
    out = []
    for case in root.iter("testcase"):
        for node in case.findall("skipped"):
            out.append(f"{case.get('classname')}::{case.get('name')}: {node.get('message', '')}")
    return out


def main(junit_xml: str) -> int:
    names = skipped(junit_xml)
    if not names:
        print("test: CI: 0 skipped", file=sys.stderr)
        return 0
    print(f"test: CI: {len(names)} skipped; every test must run under CI:", file=sys.stderr)
    for name in names:
        print(f"  {name}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

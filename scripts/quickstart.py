"""Prints the README's quick start, one command per line: the lines of the first ```bash
block under the "## Quick start" heading. .ci/run runs exactly these lines in a fresh
venv, and a test checks their shape, so the README and CI cannot drift apart.

    python3 scripts/quickstart.py [README.md]"""

import sys
from pathlib import Path

HEADING = "## Quick start"


def commands(readme: str) -> list[str]:
    if HEADING not in readme.splitlines():
        raise SystemExit(f"quickstart: no '{HEADING}' heading in the README")
    section = readme.split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    if "```bash\n" not in section:
        raise SystemExit(f"quickstart: no ```bash block under '{HEADING}'")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "README.md")
    print("\n".join(commands(path.read_text(encoding="utf-8"))))

"""One coverage-guided fuzz target under atheris (libFuzzer): run by ``python -m tests.fuzz``.

python -m tests.fuzz.one TARGET [libFuzzer flags, e.g. -max_total_time=600 CORPUS_DIR]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():  # the proxy's parsers, for coverage feedback
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(
            f"usage: python -m tests.fuzz.one TARGET [libFuzzer flags]; targets: {', '.join(TARGETS)}"
        )
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

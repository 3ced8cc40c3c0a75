"""`python -m codegen [--check]`."""

import sys

from .generate import ROOT, generate_all, stale_files
from .schema import SchemaError


def main() -> int:
    try:
        if "--check" in sys.argv[1:]:
            stale = stale_files()
            for path in stale:
                print(f"stale: {path.relative_to(ROOT)}")
            return 1 if stale else 0
        for path, text in generate_all().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    except SchemaError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 1
    return 0


sys.exit(main())

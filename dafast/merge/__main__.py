"""`python -m dafast.merge CONFIG.yml OUT_DIR`: see dafast.merge.cli."""

from dafast.merge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

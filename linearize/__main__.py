"""`python -m linearize` is the same as the `linearize` console script."""
from stages.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

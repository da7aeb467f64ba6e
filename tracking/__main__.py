"""``python -m tracking``: the same command line as the ``tracking`` script."""

from tracking.cli import main

if __name__ == "__main__":
    main()

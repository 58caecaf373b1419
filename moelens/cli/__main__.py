"""``python -m moelens.cli``: the same as the ``moelens`` console script."""

from moelens.cli import main

main()

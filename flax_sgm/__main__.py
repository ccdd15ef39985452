"""`python -m flax_sgm`: the `flax-sgm` command line."""

from flax_sgm.cli import main

main()

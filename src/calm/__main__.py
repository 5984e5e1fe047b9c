"""`python -m calm ...` (also what torchrun runs: `torchrun ... -m calm train ...`)."""

from calm.cli import main

if __name__ == "__main__":
    main()

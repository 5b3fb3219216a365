"""`python -m compressor` (also what torchrun launches for distributed runs)."""
from .cli import main

if __name__ == "__main__":
    main()

"""`python -m compressor` (also what torchrun launches for distributed runs)."""
from compressor.app.cli import main

if __name__ == "__main__":
    main()

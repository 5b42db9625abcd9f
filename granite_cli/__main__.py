"""`python -m granite_cli` is `granite-vision` (and what `accelerate launch -m granite_cli` runs)."""

from .cli import main

if __name__ == "__main__":
    main()

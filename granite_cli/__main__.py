"""`python -m granite_cli` is `granite-vision` (and what `accelerate launch -m granite_cli` runs)."""

import signal
import sys


def main() -> None:
    """Entry point of both `python -m granite_cli` and the `granite-vision` script. SIGTERM is
    made a KeyboardInterrupt before anything else is imported, so a signal at any moment ends
    the run the same way: one line, exit 130, no traceback."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()

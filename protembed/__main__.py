"""`python -m protembed` entry point."""

from protembed.cli import main

if __name__ == "__main__":
    main()

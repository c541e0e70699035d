"""Entry point for ``python -m histodiffusion`` and ``accelerate launch -m histodiffusion``."""

from histodiffusion.cli import main

if __name__ == "__main__":
    main()

"""``python -m lightning_sae``: the ``lightning-sae`` command line."""

from lightning_sae.cli import main

if __name__ == "__main__":
    main()

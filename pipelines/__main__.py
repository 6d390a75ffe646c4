"""``python -m pipelines`` = the ``gan-pipeline`` command (for environments where the console script is not
installed, e.g. a container image that only puts the source on PYTHONPATH)."""
from pipelines.cli import main

if __name__ == "__main__":
    main()

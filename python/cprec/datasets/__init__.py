"""Datasets shipped with the package. ``ml-latest-small`` (GroupLens; licence in its README.txt)."""
from pathlib import Path

DATASETS_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = DATASETS_DIR / "ml-latest-small" / "ratings.csv.gz"

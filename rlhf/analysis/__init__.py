"""Reading run dirs and drawing them (standard library, PyYAML and matplotlib; no torch, no Hydra): the
library behind ``python -m rlhf.report`` and notebooks/compare_runs.ipynb."""

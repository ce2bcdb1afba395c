"""Models shipped inside Python packages, run in worker processes: nothing downloads."""

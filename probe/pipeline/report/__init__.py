"""The comparative HTML report: any set of run dirs (or a Hydra sweep) on one self-contained page."""

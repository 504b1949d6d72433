"""Scoring maps: phantom sphere location and ROI tables, map metrics (NRMSE, SSIM, coverage, AUC), and
the side-by-side comparison report (`qmri compare`)."""

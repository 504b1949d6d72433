"""The physics of an inversion-recovery acquisition: the protocol (times in s), the signal model with its
Jacobian and Cramér-Rao bound, and image formation (noise, echo-train blurring, k-space truncation)."""

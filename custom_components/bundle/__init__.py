"""What the MONAI bundles are made of: data transforms, validation metrics, resumable training with
weights cards, and release / pack / unpack of a bundle."""

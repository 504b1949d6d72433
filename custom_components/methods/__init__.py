"""The mapping methods' building blocks: the classical fit, the networks, the diffusion samplers and
ensemble inferer, the RIM, and the scaling between physical maps and network space."""

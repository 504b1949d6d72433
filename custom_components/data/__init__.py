"""Where maps come from: brain anatomy and tissue values, synthetic training scenes and the NIST/ISMRM
phantom (reference values, geometry, digital twin)."""

"""qMRI Diffusor: T1, proton-density and inversion-efficiency mapping from inversion-recovery images.

The folders are the layers, each importing only the ones before it (tests/test_architecture.py):

- ``physics``: the acquisition ``protocol``, the ``signal_model`` (signal, Jacobian, Cramér-Rao
  bound) and ``image_formation`` (noise, echo-train blurring, k-space truncation);
- ``io``: reading NIfTI, BIDS and DICOM series, writing maps and derivatives;
- ``data``: ``anatomy`` and ``tissues`` (synthetic brains), ``synthesis`` (training scenes),
  ``phantoms`` (the NIST/ISMRM digital twin);
- ``methods``: the classical ``fitting``, ``networks``, diffusion ``inferers``, the ``rim``, ``scaling``;
- ``bundle``: what the MONAI bundles are made of (transforms, metrics, training and weights cards,
  packaging);
- ``mapping``: the output contract, ``map_series`` for every method, learned methods through their
  bundles, the physics-consistency check;
- ``reporting``: phantom evaluation, map metrics, the side-by-side comparison;
- ``cli``: the ``qmri`` command.

T1 is in seconds everywhere inside the package.
"""

__version__ = "0.1.0"

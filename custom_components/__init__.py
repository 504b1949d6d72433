"""qMRI Diffusor: T1, proton-density and inversion-efficiency mapping from inversion-recovery images.

Modules are named for what they do: ``protocol`` (acquisition), ``signal_model`` (the IR signal,
its Jacobian and the Cramér-Rao bound), ``noise`` and ``image_formation`` (how scanner images come
about), ``anatomy`` and ``tissues`` (where synthetic brains come from), ``synthesis`` (training
data), ``phantoms`` (the NIST/ISMRM digital twin), ``fitting`` (the classical fit), ``io``
(NIfTI, BIDS and DICOM), ``evaluation`` (phantom reports) and ``cli`` (the ``qmri`` command).
T1 is in seconds everywhere inside the package.
"""

__version__ = "0.1.0"

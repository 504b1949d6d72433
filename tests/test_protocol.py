"""A learned model maps only the timing it was trained for: the inversion times and the repetition times."""

import numpy as np
import pytest
import torch

from custom_components.physics.protocol import (ProtocolError, check_same_timing, get_protocol, nist_15t_protocol,
                                        paper_protocol)
from custom_components.physics.signal_model import signal


def test_same_protocol_passes_and_small_differences_are_tolerated():
    check_same_timing(paper_protocol(), paper_protocol())
    check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=10.1))  # 1 %
    check_same_timing(nist_15t_protocol(True), nist_15t_protocol(True))


def test_tr_differences_that_change_the_signal_are_refused():
    # the reason for the check: the Siemens scans' TR (growing to 2.46 s) against TR 1 s changes the
    # signal of T1 = 1 s at TI 0.8 s from 0.47 to 0.19 PD
    params = torch.tensor([1.0, 1.0, 2.0])
    s_const = signal(params, nist_15t_protocol(False), dim=0)
    s_var = signal(params, nist_15t_protocol(True), dim=0)
    np.testing.assert_allclose([float(s_const[-1]), float(s_var[-1])], [0.47, 0.19], atol=0.01)
    with pytest.raises(ProtocolError, match=r"trained for TR 1.0 s, the input has TR \[1.0, 1.0, 1.0, 1.26, 1.86, 2.46\] s"):
        check_same_timing(nist_15t_protocol(False), nist_15t_protocol(True))
    with pytest.raises(ProtocolError, match="trained for TR 10.0 s, scan.nii has TR 3.0 s"):
        check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=3.0), where="scan.nii")


def test_inversion_times_are_checked_first_and_unknown_tr_is_not_refused():
    with pytest.raises(ProtocolError, match="trained for TIs"):
        check_same_timing(paper_protocol(), get_protocol("nist15"))
    check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=None))

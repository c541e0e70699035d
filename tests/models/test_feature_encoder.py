"""The feature encoder's Inception-v3 path (models/feature_encoder.py): offline, it fails fast with the path."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from histodiffusion.errors import UserError
from histodiffusion.models.feature_encoder import inception_available, inception_features


def test_inception_missing_weights_fails_fast(tmp_path):
    missing = tmp_path / "nope" / "weights-inception-2015-12-05-6726825d.pth"
    start = time.monotonic()
    assert not inception_available(missing)
    with pytest.raises(UserError, match=re.escape(str(missing))):
        inception_features(np.zeros((2, 32, 32, 3), np.uint8), missing)
    assert time.monotonic() - start < 2


def test_unknown_backbone_is_a_user_error():
    from histodiffusion.models.feature_encoder import FeatureEncoder

    with pytest.raises(UserError, match="unknown feature backbone 'no-such-net'"):
        FeatureEncoder(architecture="no-such-net")

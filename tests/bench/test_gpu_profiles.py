from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from bench.gpu_profiles import GPUS, MODELS, calibrate, gpu_profile, profile_name
from shared.roofline import SHIPPED_PROFILES, load_profile

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "profiles"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"measured profiles not at {DATA}")


@needs_data
@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.name)
def test_calibration_matches_held_out_measurements(gpu) -> None:
    cal = calibrate(gpu, DATA)
    assert cal.quality.r2 > 0.98 and cal.quality.mape < 0.1
    assert 0.3 < 1 / cal.layer_params.inv_flops / gpu.peak_flops <= 1.0
    assert 0.3 < 1 / cal.layer_params.inv_bandwidth / gpu.bandwidth <= 1.0


@needs_data
def test_shipped_profiles_are_what_the_derivation_produces() -> None:
    for gpu in GPUS:
        cal = calibrate(gpu, DATA)
        for model in MODELS:
            shipped, derived = load_profile(SHIPPED_PROFILES / profile_name(gpu, model)), gpu_profile(model, cal)
            assert (shipped.model, shipped.hardware, shipped.source) == (derived.model, derived.hardware, derived.source)
            for part in ("params", "quality"):  # least squares differs in the last bits across BLAS builds
                a, b = (msgspec.structs.asdict(getattr(p, part)) for p in (shipped, derived))
                assert a.keys() == b.keys()
                assert all(a[k] == b[k] if isinstance(a[k], (str, int)) else math.isclose(a[k], b[k], rel_tol=1e-9)
                           for k in a), part

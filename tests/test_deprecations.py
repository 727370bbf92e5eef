"""Names that changed in 0.2 keep working for one release, each with a DeprecationWarning naming the
new one; and the top-level namespace holds the user API only."""

from __future__ import annotations

import importlib
import sys

import pytest

import checkpoint_stability
from checkpoint_stability._moved import MOVED_MODULES, MOVED_NAMES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_a_moved_module_imports_under_its_old_path_as_the_same_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED_MODULES[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])
    sys.modules.pop(old, None)


@pytest.mark.parametrize("name", sorted(MOVED_NAMES))
def test_a_name_that_left_the_top_level_still_resolves_with_a_warning(name):
    with pytest.warns(DeprecationWarning, match=MOVED_NAMES[name]):
        value = getattr(checkpoint_stability, name)
    assert value is getattr(importlib.import_module(MOVED_NAMES[name]), name)


def test_the_top_level_namespace_is_the_user_api():
    for name in checkpoint_stability.__all__:
        assert getattr(checkpoint_stability, name) is not None
    assert not set(checkpoint_stability.__all__) & set(MOVED_NAMES)
    with pytest.raises(AttributeError):
        checkpoint_stability.no_such_name  # noqa: B018


def test_resum_every_is_the_deprecated_name_of_exact_sum_every():
    import torch

    from checkpoint_stability import StabilityConfig
    from checkpoint_stability.averaging import WindowAverage

    with pytest.warns(DeprecationWarning, match="exact_sum_every"):
        config = StabilityConfig(resum_every=7)
    assert config.exact_sum_every == 7 and config.exact_sum_interval == 7
    with pytest.warns(DeprecationWarning, match="exact_sum_every"):
        restored = StabilityConfig.from_settings("test", {"resum_every": 3})
    assert restored.exact_sum_every == 3
    with pytest.warns(DeprecationWarning, match="exact_sum_every"):
        average = WindowAverage(torch.float32, resum_every=5)
    assert average.exact_sum_every == 5

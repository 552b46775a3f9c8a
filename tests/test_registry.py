import pytest

import vlm_inspect
from vlm_inspect.registry import Registry


def test_registry_register_get_list():
    r = Registry("thing")

    @r.register("Alpha", kind="a")
    class Alpha:
        pass

    r.register("beta", object(), kind="b")
    assert r.get("alpha") is Alpha and r.get("ALPHA") is Alpha
    assert r.list() == ["alpha", "beta"] and r.list(kind="b") == ["beta"] and r.list(kind=None) == ["alpha", "beta"]
    assert "alpha" in r and "gamma" not in r and len(r) == 2
    assert r.meta("alpha") == {"kind": "a"}
    with pytest.raises(ValueError, match="unknown thing 'gamma'; valid: alpha, beta"):
        r.get("gamma")
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha", object())


def test_public_api_is_importable():
    for name in vlm_inspect.__all__:
        assert getattr(vlm_inspect, name) is not None
    with pytest.raises(AttributeError):
        vlm_inspect.not_a_thing  # noqa: B018

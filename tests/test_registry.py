import pytest

from mage_bench.errors import UserError
from mage_bench.registry import Registry


def test_register_and_get():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    assert reg.get("alpha") == 1
    assert reg.names() == ["alpha", "beta"]
    assert "beta" in reg and len(reg) == 2


def test_miss_suggests_close_names():
    reg: Registry[int] = Registry("widget")
    reg.register("truncnorm")(1)
    with pytest.raises(UserError, match=r"unknown widget 'trucnorm' \(did you mean 'truncnorm'\?\)"):
        reg.get("trucnorm")


def test_miss_without_close_name_lists_choices():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    with pytest.raises(UserError) as info:
        reg.get("zzz")
    assert "did you mean" not in str(info.value) and "choose one of: alpha" in str(info.value)


def test_duplicate_registration_is_an_error():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)

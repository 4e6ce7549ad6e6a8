"""The glibc allocator limits are applied where glibc runs."""

import platform

import pytest

from engine.host_memory import tune_host_malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_allocator_limits():
    assert tune_host_malloc() is True
